"""The trainer on real S3 (moto over HTTP, through a fault-injecting proxy): an upload cut mid-way
leaves ``latest`` on the previous good checkpoint, and the run resumes from it exactly."""

from __future__ import annotations

import re
import signal

import pytest

from launch.preempt import children_of
from launch.store import CheckpointStore
from schemas.contract import STEP_PAUSE_ENV
from tests.conftest_s3 import s3_storage_options
from tests.support.procs import alive, wait_for
from tests.support.trainer import (
    Tail,
    assert_identical,
    final_state,
    run_trainer,
    start_trainer,
    tiny_spec,
    write_spec,
)

pytestmark = [pytest.mark.slow]


def _s3_spec(data_root, url, endpoint, **overrides):
    return tiny_spec(
        data_root,
        checkpoint__url=url,
        checkpoint__storage_options=s3_storage_options(endpoint),
        **({"optim__max_steps": 10} | overrides),
    )


def test_cut_upload_keeps_latest_and_resume_is_exact(tmp_path, moto_s3, fault_proxy, s3_url):
    data_root = tmp_path / "data"
    longer = {"optim__epochs": 7, "optim__max_steps": 40}  # room for a slow start of the uploader
    golden_spec = write_spec(tmp_path / "golden.json", tiny_spec(data_root, **longer))
    assert run_trainer(golden_spec, tmp_path / "golden").returncode == 0
    golden = final_state(str(tmp_path / "golden" / "checkpoints"))

    spec = write_spec(tmp_path / "spec.json", _s3_spec(data_root, s3_url, fault_proxy.url, **longer))
    options = s3_storage_options(moto_s3.endpoint)
    store = CheckpointStore(s3_url, options)
    proc = start_trainer(spec, tmp_path / "run")
    with Tail(proc) as tail:
        tail.wait_for(" committed in ")  # some checkpoint committed (the uploader may start late)
        fault_proxy.reset_after(2048, once=False)  # every connection cut after 2 KiB: uploads fail mid-body
        upload_failed = re.compile(r"of step (\d+) failed: ")  # other lines may fail first (metrics, status)
        wait_for("an upload to fail", lambda: upload_failed.search(tail.text()) is not None, 180, 0.1)
        failed = int(upload_failed.search(tail.text()).group(1))  # type: ignore[union-attr]
        committed = store.latest()["step"]
        assert committed < failed
        tail.wait_for(f"step {failed + 2}/40")  # training went on while that upload failed
        (uploader,) = children_of(proc.pid)  # num_workers 0: the uploader is the trainer's only child
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for("the uploader to exit with its trainer", lambda: not alive(uploader), 10, 0.1)
        assert store.latest()["step"] == committed
        assert store.resolve().step == committed

    fault_proxy.passthrough()
    res = run_trainer(spec, tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {committed}" in res.stderr
    assert_identical(golden, final_state(s3_url, options))


def test_retried_uploads_leave_every_checkpoint_file_as_without_faults(
    tmp_path, moto_s3, fault_proxy, s3_url
):
    """Connections cut during uploads are retried and the run completes; the retries draw from no RNG
    stream the trainer saves (botocore's jitter would move Python's ``random``): every file of the final
    checkpoint, the per-rank RNG states included, equals a fault-free run's."""
    data_root = tmp_path / "data"
    golden_spec = write_spec(tmp_path / "golden.json", tiny_spec(data_root, optim__max_steps=10))
    assert run_trainer(golden_spec, tmp_path / "golden").returncode == 0
    golden = final_state(str(tmp_path / "golden" / "checkpoints"))

    spec = write_spec(tmp_path / "spec.json", _s3_spec(data_root, s3_url, fault_proxy.url))
    with fault_proxy.cuts_now_and_then(every_s=0.3, nbytes=4096):
        res = run_trainer(spec, tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert fault_proxy.stats.resets >= 3, fault_proxy.stats
    assert_identical(golden, final_state(s3_url, s3_storage_options(moto_s3.endpoint)))


def test_a_stall_delays_checkpoints_by_seconds_not_minutes(tmp_path, moto_s3, fault_proxy, s3_url):
    """The store stalls every connection for 30 s (accepted, never answered again) in the middle of a
    run: each store call abandons its stalled connection, so a checkpoint commits once the store answers
    again, the run completes and ends as a run without the stall. How soon after the stall the commit
    comes is benches/bench_deadlines.py's figure. The run is paced (``STEP_PAUSE_ENV``, a sleep after
    each step that changes nothing it computes) to outlast the stall: a minute for 60 steps."""
    data_root = tmp_path / "data"
    longer = {
        "optim__epochs": 100,
        "optim__max_steps": 60,
        "checkpoint__every_steps": 5,
        "log_every_steps": 5,
    }
    golden_spec = write_spec(tmp_path / "golden.json", tiny_spec(data_root, **longer))
    assert run_trainer(golden_spec, tmp_path / "golden").returncode == 0
    golden = final_state(str(tmp_path / "golden" / "checkpoints"))

    spec = write_spec(tmp_path / "spec.json", _s3_spec(data_root, s3_url, fault_proxy.url, **longer))
    options = s3_storage_options(moto_s3.endpoint)
    observer = CheckpointStore(s3_url, options)  # straight to moto, not through the proxy
    proc = start_trainer(spec, tmp_path / "run", **{STEP_PAUSE_ENV: "1.0"})
    with Tail(proc) as tail:
        tail.wait_for(" committed in ")
        fault_proxy.stall_for(30.0)
        assert fault_proxy.stall_ended.wait(120)
        assert proc.poll() is None, "the run ended during the stall: make it longer"
        before = (observer.latest() or {}).get("step", 0)
        wait_for(
            "a commit after the stall",
            lambda: (observer.latest() or {}).get("step", 0) > before or proc.poll() is not None,
            90,
            0.1,
        )
        assert (observer.latest() or {}).get("step", 0) > before
        assert fault_proxy.stats.stalled >= 1, fault_proxy.stats  # the stall caught store calls
        assert proc.wait(timeout=300) == 0, tail.text()[-3000:]
    assert "Traceback" not in tail.text()
    assert_identical(golden, final_state(s3_url, options))
