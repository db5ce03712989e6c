"""When a run will finish, as ``pixpro status`` estimates it: a running run's ETA from the trainer's
recent pace, a pending job's expected start from squeue, and the requeues so far. The live squeue
``%S`` answer is checked on the test cluster in tests/test_slurm_accounting.py."""

from __future__ import annotations

import time
from pathlib import Path

from cluster import render, slurm
from cluster.attempts import AttemptState, slurm_state
from cluster.progress import Progress
from cluster.status import collect, eta_s
from tests.support.runs import fake_runs


def test_a_running_runs_eta_is_the_steps_left_at_its_recent_pace() -> None:
    p = Progress(metrics={"step": 10, "total_steps": 110, "steps_per_s": 2.0, "time": time.time()})
    assert eta_s("RUNNING", p) == 50.0
    for state in ("PENDING", "PREEMPTED", "COMPLETED", "STALLED"):
        assert eta_s(state, p) is None, state
    assert eta_s("RUNNING", Progress(metrics={"step": 10, "total_steps": 110})) is None  # pace unknown


def test_squeue_gives_a_pending_jobs_expected_start() -> None:
    jobs = {j: slurm.SlurmJob(j) for j in ("41", "42", "43")}
    slurm.parse_squeue(
        "41|PENDING|Priority|2026-12-06T03:15:00\n42|PENDING|Resources|N/A\n43|RUNNING|None|2026-12-05T20:00:00\n",
        jobs,
    )
    assert jobs["41"].expected_start == time.mktime(time.strptime("2026-12-06T03:15:00", "%Y-%m-%dT%H:%M:%S"))
    assert jobs["42"].expected_start is None  # not planned yet
    assert jobs["43"].expected_start is None  # running: its start is not an expectation
    st = slurm_state(jobs["41"], None, cancelled=False, recent=False)
    assert (st.state, st.expected_start) == ("PENDING", jobs["41"].expected_start)


def test_requeues_count_the_runs_that_were_requeued() -> None:
    assert AttemptState("RUNNING", history=("REQUEUED", "PREEMPTED")).requeues == 2
    assert AttemptState("COMPLETED", history=("REQUEUED", "COMPLETED")).requeues == 1
    assert AttemptState("PENDING").requeues == 0


def test_every_row_says_eta_expected_start_and_requeues(tmp_path: Path) -> None:
    rows, _ = collect(fake_runs(tmp_path / "home", 5))
    for row in rows:
        assert {"eta_s", "expected_start", "requeues"} <= set(row), row
        assert row["eta_s"] is None or row["state"] == "RUNNING", row


def test_the_table_shows_the_eta_or_the_expected_start() -> None:
    assert render.eta({"eta_s": 3725.0}) == "1h02m"
    start = time.mktime(time.strptime("2026-12-06T03:15:00", "%Y-%m-%dT%H:%M:%S"))
    assert render.eta({"eta_s": None, "expected_start": start}) == "starts 12-06 03:15"
    assert render.eta({"eta_s": None, "expected_start": None}) == "-"


def test_a_completing_first_run_is_no_restart() -> None:
    """While a job completes, the accounting already lists its run as ended: that run is not an earlier
    one (a first attempt being cancelled read ``completing, restart 1``)."""

    def run(state: str) -> slurm.HistoryLine:
        return slurm.HistoryLine(state, 0, 0, start=time.time() - 60, end=time.time())

    first = slurm.SlurmJob("51", queue_state="COMPLETING", history=[run("CANCELLED")])
    assert slurm_state(first, None, cancelled=True, recent=True).reason == "completing"
    assert slurm_state(first, None, cancelled=True, recent=True).requeues == 0
    again = slurm.SlurmJob("52", queue_state="COMPLETING", history=[run("REQUEUED"), run("CANCELLED")])
    assert slurm_state(again, None, cancelled=True, recent=True).reason == "completing, restart 1"
    running = slurm.SlurmJob("53", queue_state="RUNNING", history=[run("REQUEUED")])
    assert slurm_state(running, None, cancelled=False, recent=True).reason == "restart 1"


def test_lr_and_ema_are_those_of_the_step_shown() -> None:
    """An attempt that ended at step 8 after its last metrics record (step 5): status.json holds the
    schedule's LR and EMA momentum at step 8, so they are shown beside it, not step 5's."""
    now = time.time()
    metrics = {"step": 5, "lr": 0.25, "ema_momentum": 0.99043, "time": now - 10}
    ended = Progress(
        trainer={"step": 8, "lr": 0.2, "ema_momentum": 0.9911, "updated": now}, metrics=dict(metrics)
    )
    assert (ended.step, ended.now("lr"), ended.now("ema_momentum")) == (8, 0.2, 0.9911)
    started = Progress(trainer={"step": 0, "lr": None, "updated": now - 60}, metrics=dict(metrics))
    assert (started.step, started.now("lr"), started.now("ema_momentum")) == (5, 0.25, 0.99043)
