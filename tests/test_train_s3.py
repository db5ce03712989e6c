"""The trainer on real S3 (moto over HTTP, through a fault-injecting proxy): an upload cut mid-way
leaves ``latest`` on the previous good checkpoint, and the run resumes from it exactly."""

from __future__ import annotations

import signal
import time

import pytest

from launch.store import CheckpointStore
from tests.conftest_s3 import s3_storage_options
from tests.support.trainer import (
    REPO,
    assert_identical,
    final_state,
    run_trainer,
    tiny_spec,
    trainer_env,
    write_spec,
)

pytestmark = [pytest.mark.slow]


def _s3_spec(data_root, url, endpoint):
    return tiny_spec(
        data_root,
        checkpoint__url=url,
        checkpoint__storage_options=s3_storage_options(endpoint),
        optim__max_steps=10,
    )


class _Tail:
    """Collects a subprocess's output lines on a thread, so the test can wait for a given log line."""

    def __init__(self, proc) -> None:
        import threading

        self.lines: list[str] = []
        self.thread = threading.Thread(
            target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True
        )
        self.thread.start()

    def wait_for(self, needle: str, proc, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.05)


def test_cut_upload_keeps_latest_and_resume_is_exact(tmp_path, moto_s3, fault_proxy, s3_url):
    import subprocess
    import sys

    data_root = tmp_path / "data"
    golden_spec = write_spec(tmp_path / "golden.json", tiny_spec(data_root, optim__max_steps=10))
    assert run_trainer(golden_spec, tmp_path / "golden").returncode == 0
    golden = final_state(str(tmp_path / "golden" / "checkpoints"))

    spec = write_spec(tmp_path / "spec.json", _s3_spec(data_root, s3_url, fault_proxy.url))
    options = s3_storage_options(moto_s3.endpoint)
    store = CheckpointStore(s3_url, options)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.train", str(spec), "--run-dir", str(tmp_path / "run")],
        cwd=REPO,
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tail = _Tail(proc)
    tail.wait_for("checkpoint step 3 committed", proc)
    fault_proxy.reset_after(2048, once=False)  # every connection cut after 2 KiB: uploads fail mid-body
    tail.wait_for("step 8/10", proc)  # training went on while the step-6 upload failed
    tail.wait_for("of step 6 failed", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert store.latest()["step"] == 3
    assert store.resolve().step == 3

    fault_proxy.passthrough()
    res = run_trainer(spec, tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step 3" in res.stderr
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
