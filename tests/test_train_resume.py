"""Golden resume: a run stopped and resumed ends bitwise identical to one that never stopped (CPU)."""

from __future__ import annotations

import pytest
import torch

from launch.metrics import read_metrics
from launch.preempt import EXIT_PREEMPTED
from launch.store import CheckpointStore
from tests.trainutil import assert_identical, final_state, run_trainer, tiny_spec, write_spec


@pytest.fixture(scope="module")
def golden(tmp_path_factory, data_root):
    """Run A: 10 steps uninterrupted, single process."""
    d = tmp_path_factory.mktemp("golden")
    spec = write_spec(d / "spec.json", tiny_spec(data_root))
    res = run_trainer(spec, d / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    return final_state(str(d / "run" / "checkpoints"))


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
    assert not torch.equal(weights["backbone.conv1.weight"], fp32_weights["backbone.conv1.weight"])
