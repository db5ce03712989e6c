"""Runs as the trainer and the runner leave them on disk, without starting a job: for ``pixpro status``
tests and ``benches/bench_status.py``. Every fifth run is a SLURM job id that SLURM never saw."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cluster.index import Index
from cluster.record import RunRecord, atomic_write, write_local
from launch.store import CheckpointStore
from schemas.contract import MetricsRecord, TrainerStatus


def fake_run(home: Path, i: int) -> RunRecord:
    """A finished run as the trainer and the runner leave it (no job is started)."""
    run_id = f"r{i:02d}-20260101-000000-{i:04x}"
    rdir = home / "runs" / run_id
    ckpt = rdir / "checkpoints"
    slurm = i % 5 == 0
    job = f"99{i:05d}" if slurm else f"local-{i + 1}"
    now = time.time()
    rec = RunRecord(
        run_id=run_id,
        name=f"r{i:02d}",
        spec_hash="0" * 64,
        created=now - 3600 + i,
        executor="slurm" if slurm else "local",
        run_dir=str(rdir),
        workdir=str(home),
        checkpoint_url=str(ckpt),
        resources={"nodes": 1, "gpus_per_node": 0},
        attempts=[job],
        submitted={job: now - 3600},
    )
    write_local(rec)
    code = (0, 75, 1, 0)[i % 4]
    attempt = job if not slurm else f"{job}.0"
    if not slurm:
        atomic_write(
            rdir / "local" / f"{job}.json",
            json.dumps(
                {"job_id": job, "pid": None, "started": now - 60, "ended": now - 5, "exit_code": code}
            ).encode(),
        )
    state = {0: "completed", 75: "preempted", 1: "running"}[code]
    step = 12 if code == 0 else 6
    # What the trainer leaves, written through the trainer's own store code (the file contract).
    store = CheckpointStore(str(ckpt), attempt=attempt)
    store.commit(step, [store.write(step, "rank0.pt", b"weights")], {"world_size": 1})
    status = TrainerStatus(
        updated=now - 5, state=state, step=step, total_steps=12, epoch=step // 2, attempt=attempt,
        committed_step=step,
    )  # fmt: skip
    store.put_aux("status.json", status.model_dump_json().encode())
    records = [
        MetricsRecord(
            time=now - 60 + s, attempt=attempt, step=s, epoch=s // 2, loss=1.0 / s, lr=0.01 * s,
            ema_momentum=0.99 + s / 10000, img_per_s=10.0 + s, positives=3.0, total_steps=12,
        ).model_dump_json()
        for s in range(1, step + 1)
    ]  # fmt: skip
    store.put_aux(f"metrics/{attempt}.000000.jsonl", ("\n".join(records) + "\n").encode())
    return rec


def fake_runs(home: Path, n: int) -> list[RunRecord]:
    """``n`` runs in ``home``'s registry: finished, preempted, failed and running ones in turn."""
    records = [fake_run(home, i) for i in range(n)]
    index = Index(home)
    for rec in records:
        index.put(rec)
    return records
