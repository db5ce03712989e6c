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
from cluster.record import RunRecord, write_local
from launch.store import CheckpointStore
from schemas.contract import STATUS_FILE, TrainerStatus
from tests.conftest_s3 import FAKE_KEY_ID, FAKE_SECRET, MotoS3, s3_storage_options
from tests.faultproxy import FaultProxy


def _record(home: Path, name: str, url: str, **resources: int) -> RunRecord:
    """A registered local-executor run named ``name`` with its checkpoints at ``url``."""
    rec = RunRecord(
        run_id=f"{name}-20260101-000000-abcd",
        name=name,
        spec_hash="0" * 64,
        created=time.time(),
        executor="local",
        run_dir=str(home / "runs" / name),
        workdir=str(home),
        checkpoint_url=url,
        resources={"nodes": 1, "gpus_per_node": 0, **resources},
    )
    write_local(rec)
    Index(home).put(rec)
    return rec


def _s3_run(home: Path, url: str, moto: MotoS3) -> RunRecord:
    """A local-executor run whose checkpoints are on S3; its record names no endpoint (as the README
    recommends: the endpoint comes from the environment)."""
    rec = _record(home, "s3run", url)
    store = CheckpointStore(url, s3_storage_options(moto.endpoint), attempt="local-1")
    store.commit(8, [store.write(8, "rank0.pt", b"weights")], {"world_size": 1})
    status = TrainerStatus(
        updated=time.time(), state="running", step=9, total_steps=20, epoch=1, attempt="local-1"
    )
    store.put_aux(STATUS_FILE, status.model_dump_json().encode())
    return rec


def _status(home: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PIXPRO_HOME": str(home),
        "PIXPRO_S3_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "s3run", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_status_finds_the_endpoint_the_trainer_uses(tmp_path: Path, moto_s3: MotoS3, s3_url: str) -> None:
    _s3_run(tmp_path / "home", s3_url, moto_s3)
    proc = _status(tmp_path / "home", moto_s3.endpoint)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["store_error"] is None, row
    assert (row["step"], row["checkpoint_step"], row["trainer_state"]) == (9, 8, "running"), row


def test_status_on_a_stalled_server_ends_within_the_deadline(
    tmp_path: Path, moto_s3: MotoS3, s3_url: str, fault_proxy: FaultProxy
) -> None:
    _s3_run(tmp_path / "home", s3_url, moto_s3)
    fault_proxy.stall()  # accepts connections, forwards nothing: every read hangs
    proc = _status(tmp_path / "home", fault_proxy.url)
    fault_proxy.passthrough()
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["store_error"] and "deadline" in row["store_error"], row
    assert "cannot read" in proc.stderr and "Traceback" not in proc.stderr
    # it answered (within _status's 120 s cap): how soon is benches/bench_deadlines.py's figure


def test_status_warns_when_the_signal_lead_is_short_of_the_commit_time_and_the_store_fails(
    tmp_path: Path,
) -> None:
    """What decides whether a preemption loses work, in one line each: the lead time against the
    measured commit time, a trainer that cannot reach its store, a preemption that did not commit."""
    home, url = tmp_path / "home", str(tmp_path / "ckpt")
    _record(home, "lead", url, signal_lead_s=30)
    store = CheckpointStore(url, attempt="local-1")
    store.commit(8, [store.write(8, "rank0.pt", b"weights")], {"world_size": 1})
    status = TrainerStatus(
        updated=time.time() - 60, state="preempted", step=9, total_steps=20, epoch=1, attempt="local-1",
        last_commit_s=12.0, preempt_committed=False,
    )  # fmt: skip
    store.put_aux(STATUS_FILE, status.model_dump_json().encode())
    metrics = {
        "time": time.time(), "attempt": "local-1", "step": 9, "epoch": 1, "loss": 0.5, "lr": 0.1,
        "ema_momentum": 0.99, "img_per_s": 3.0, "positives": 1.0, "total_steps": 20, "commit_s": 17.5,
        "store_error": "upload train.pt of step 9 failed: StoreUnavailable",
    }  # fmt: skip
    store.put_aux("metrics/local-1.000000.jsonl", (json.dumps(metrics) + "\n").encode())
    env = {**os.environ, "PIXPRO_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "lead", "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert (row["commit_s"], row["signal_lead_s"], row["preempt_committed"]) == (17.5, 30, False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pixpro: warning: run lead-")]
    assert len(lines) == 3, proc.stderr
    assert "signal_lead_s 30 s is less than twice the last checkpoint's commit time (17.5 s)" in lines[0]
    assert "cannot reach its checkpoint store" in lines[1] and "StoreUnavailable" in lines[1]
    assert "did not commit its checkpoint in time" in lines[2] and "from step 8" in lines[2]
