"""Golden resume: a run stopped and resumed ends bitwise identical to one that never stopped (CPU)."""

from __future__ import annotations

import pytest
import torch

from launch.preempt import EXIT_PREEMPTED
from launch.records import read_metrics
from launch.store import CheckpointStore
from tests.support import zygote
from tests.support.shared import run_fixtures
from tests.support.trainer import assert_identical, final_state, run_trainer, tiny_spec, write_spec

pytestmark = [pytest.mark.slow]


# Run A, 10 steps uninterrupted in one process, is the session's tiny run: the tests train on its dataset.
data_root, golden = run_fixtures("tiny_run")


def _segments(tmp_path, data_root, stops, nproc=1, **overrides):
    spec = write_spec(tmp_path / "spec.json", tiny_spec(data_root, **overrides))
    run = tmp_path / "run"
    for k in stops:
        res = run_trainer(spec, run, nproc=nproc, PIXPRO_STOP_AT_STEP=str(k))
        assert res.returncode == EXIT_PREEMPTED, res.stderr[-3000:]
        assert final_state(str(run / "checkpoints"))["__step__"] == k
    res = run_trainer(spec, run, nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    return final_state(str(run / "checkpoints")), res


@pytest.mark.parametrize("workers", [0, 2])
def test_two_resumes_mid_epoch_and_at_boundary_equal_uninterrupted(tmp_path, data_root, golden, workers):
    # 6 steps an epoch: stop at 4 (mid-epoch 0), then at 6 (the epoch boundary), then finish at 10.
    state, res = _segments(tmp_path, data_root, [4, 6], data__num_workers=workers)
    assert state["__step__"] == 10
    assert_identical(golden, state)
    assert "resumed from step 6" in res.stderr
    records = read_metrics(CheckpointStore(str(tmp_path / "run" / "checkpoints")))
    assert [r.get("resumed_from") for r in records] == [None] * 4 + [4] * 2 + [6] * 4  # plot's resume marks
    # the pace pixpro status estimates the end from: the global images per second over the batch
    batch = records[0]["img_per_s"] / records[0]["steps_per_s"]
    assert all(r["steps_per_s"] > 0 for r in records)
    per_step = [r["img_per_s"] / r["steps_per_s"] for r in records]
    assert per_step == pytest.approx([batch] * len(records), rel=0.01)


def test_photometric_steps_on_the_device_give_the_worker_path_bitwise_and_resume(tmp_path, data_root, golden):
    """data.augment_on: device (workers send uint8 crops, the trainer finishes them in a batch), stopped
    mid-epoch and resumed with two loader workers, ends bitwise identical to the uninterrupted worker-path
    run: the same views, the same training."""
    state, res = _segments(tmp_path, data_root, [4], data__num_workers=2, data__augment_on="device")
    assert "resumed from step 4" in res.stderr
    assert_identical(golden, state)


def test_deterministic_mode_trains_the_same_run_on_cpu(tmp_path, data_root, golden):
    """``deterministic: true`` (for GPUs) runs on a CPU, turns torch's deterministic algorithms on, and
    changes nothing there: CPU runs are deterministic either way. It is outside the spec hash."""
    spec = write_spec(tmp_path / "spec.json", tiny_spec(data_root, deterministic=True))
    res = run_trainer(spec, tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "deterministic algorithms on" in res.stderr
    assert_identical(golden, final_state(str(tmp_path / "run" / "checkpoints")))


def test_resume_refuses_a_changed_spec(tmp_path, data_root):
    spec_path = write_spec(tmp_path / "spec.json", tiny_spec(data_root))
    run = tmp_path / "run"
    assert run_trainer(spec_path, run, PIXPRO_STOP_AT_STEP="2").returncode == EXIT_PREEMPTED
    write_spec(spec_path, tiny_spec(data_root, model__projector_out=16))
    res = run_trainer(spec_path, run)
    assert res.returncode == 2
    assert "different run spec" in res.stderr
    assert "Traceback" not in res.stderr
    assert final_state(str(run / "checkpoints"))["__step__"] == 2  # nothing committed was lost


def test_two_ranks_resume_equals_uninterrupted(tmp_path, data_root):
    a = tmp_path / "a"
    a.mkdir()
    spec = write_spec(a / "spec.json", tiny_spec(data_root, data__batch_size=2))
    res = run_trainer(spec, a / "run", nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    golden2 = final_state(str(a / "run" / "checkpoints"))
    assert {"train.pt", "rank0.pt", "rank1.pt"} <= set(golden2)

    b = tmp_path / "b"
    b.mkdir()
    state, _ = _segments(b, data_root, [3, 6], nproc=2, data__batch_size=2)
    assert_identical(golden2, state)


def test_cpu_autocast_trains_in_bf16_and_resumes_bitwise(tmp_path, data_root, golden):
    bf16 = {"precision": "bf16", "cpu_autocast": True}
    a = tmp_path / "a"
    a.mkdir()
    spec = write_spec(a / "spec.json", tiny_spec(data_root, **bf16))
    res = run_trainer(spec, a / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    uninterrupted = final_state(str(a / "run" / "checkpoints"))

    b = tmp_path / "b"
    b.mkdir()
    state, _ = _segments(b, data_root, [4], **bf16)
    assert_identical(uninterrupted, state)
    # The same run in fp32 (the golden one) ends elsewhere: autocast really ran.
    weights, fp32_weights = uninterrupted["train.pt"]["state"]["model"], golden["train.pt"]["state"]["model"]
    first_conv = next(k for k in weights if k.startswith("backbone.") and k.endswith(".weight"))
    assert not torch.equal(weights[first_conv], fp32_weights[first_conv])


def test_a_checkpoint_without_spec_hash_is_refused_in_one_line(tmp_path, data_root):
    """A train.pt that records no spec hash could belong to any run: the trainer refuses to resume it
    (exit 2, one line) and export refuses to read it; nothing committed is touched."""
    import io
    import sys

    from tests.support.trainer import REPO, trainer_env

    spec_path = write_spec(tmp_path / "spec.json", tiny_spec(data_root))
    run = tmp_path / "run"
    assert run_trainer(spec_path, run, PIXPRO_STOP_AT_STEP="2").returncode == EXIT_PREEMPTED
    store = CheckpointStore(str(run / "checkpoints"), attempt="forged")
    good = store.resolve()
    saved = torch.load(io.BytesIO(store.read(good, "train.pt")), weights_only=True)
    del saved["spec_hash"]
    buf = io.BytesIO()
    torch.save(saved, buf)
    entries = [
        store.write(3, "train.pt", buf.getvalue()),
        store.write(3, "rank0.pt", store.read(good, "rank0.pt")),
    ]
    store.commit(3, entries, dict(good.meta, step=3))

    res = run_trainer(spec_path, run)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "records no spec hash" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert CheckpointStore(str(run / "checkpoints")).resolve().step == 3  # refused, not deleted

    out = zygote.run(
        [sys.executable, "-m", "launch.tools.export", str(run / "checkpoints"), "--spec", str(spec_path),
         "--format", "torchvision", "-o", str(tmp_path / "w.pth")],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "records no spec hash" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "w.pth").exists()
