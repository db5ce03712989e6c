"""``pixpro status`` reads checkpoints, status and metrics through the trainer's own store code: the same
S3 endpoint rule (``PIXPRO_S3_ENDPOINT``) and a deadline on every call, so a stalled server costs seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cluster.index import Index
from cluster.progress import READ_TIMEOUT_S
from cluster.record import RunRecord, write_local
from launch.store import CheckpointStore
from schemas.contract import STATUS_FILE, TrainerStatus
from tests.conftest_s3 import FAKE_KEY_ID, FAKE_SECRET, MotoS3, s3_storage_options
from tests.faultproxy import FaultProxy


def _s3_run(home: Path, url: str, moto: MotoS3) -> RunRecord:
    """A local-executor run whose checkpoints are on S3; its record names no endpoint (as the README
    recommends: the endpoint comes from the environment)."""
    rec = RunRecord(
        run_id="s3run-20260101-000000-abcd",
        name="s3run",
        spec_hash="0" * 64,
        created=time.time(),
        executor="local",
        run_dir=str(home / "runs" / "s3run"),
        workdir=str(home),
        checkpoint_url=url,
        resources={"nodes": 1, "gpus_per_node": 0},
    )
    write_local(rec)
    Index(home).put(rec)
    store = CheckpointStore(url, s3_storage_options(moto.endpoint), attempt="local-1")
    store.commit(8, [store.write(8, "rank0.pt", b"weights")], {"world_size": 1})
    status = TrainerStatus(
        updated=time.time(), state="running", step=9, total_steps=20, epoch=1, attempt="local-1"
    )
    store.put_aux(STATUS_FILE, status.model_dump_json().encode())
    return rec


def _status(home: Path, endpoint: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {
        **os.environ,
        "PIXPRO_HOME": str(home),
        "PIXPRO_S3_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "s3run", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return proc, time.monotonic() - t0


def test_status_finds_the_endpoint_the_trainer_uses(tmp_path: Path, moto_s3: MotoS3, s3_url: str) -> None:
    _s3_run(tmp_path / "home", s3_url, moto_s3)
    proc, _ = _status(tmp_path / "home", moto_s3.endpoint)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["store_error"] is None, row
    assert (row["step"], row["checkpoint_step"], row["trainer_state"]) == (9, 8, "running"), row


def test_status_on_a_stalled_server_ends_within_the_deadline(
    tmp_path: Path, moto_s3: MotoS3, s3_url: str, fault_proxy: FaultProxy
) -> None:
    _s3_run(tmp_path / "home", s3_url, moto_s3)
    fault_proxy.stall()  # accepts connections, forwards nothing: every read hangs
    proc, took = _status(tmp_path / "home", fault_proxy.url)
    fault_proxy.passthrough()
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["store_error"] and "deadline" in row["store_error"], row
    assert "cannot read" in proc.stderr and "Traceback" not in proc.stderr
    assert took < 3 * READ_TIMEOUT_S + 15, took  # one call's deadline (+ interpreter start), not forever
    print(
        f"status on a stalled S3 server answered in {took:.1f} s (deadline {READ_TIMEOUT_S:.0f} s per call)"
    )
