"""A stale attempt (its node lost SLURM but not the store, so it trains on after the job was requeued)
stops at its next checkpoint once a later attempt has claimed the run, and cannot start again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launch.store import CheckpointStore
from schemas.contract import ATTEMPT_ENV, STATUS_FILE, STEP_PAUSE_ENV
from tests.support import zygote
from tests.support.trainer import REPO, Tail, run_trainer, tiny_spec, trainer_cmd, trainer_env, write_spec

pytestmark = [pytest.mark.slow]


def _start(spec: Path, run: Path, attempt: str, pause_s: float) -> subprocess.Popen:
    """One rank under our torchrun wrapper as SLURM's attempt ``attempt``, output merged (read with Tail)."""
    return zygote.popen(
        trainer_cmd(spec, run, nproc=1, max_restarts=1),
        cwd=REPO,
        env=trainer_env(**{ATTEMPT_ENV: attempt, STEP_PAUSE_ENV: str(pause_s)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_stale_attempt_stops_at_its_next_checkpoint_and_cannot_start_again(tmp_path, data_root):
    spec = write_spec(
        tmp_path / "spec.json",
        tiny_spec(
            data_root,
            optim__epochs=8,
            optim__max_steps=40,
            checkpoint__every_steps=2,
            resources__max_restarts=1,
        ),
    )
    run = tmp_path / "run"
    url = str(run / "checkpoints")
    stale = _start(spec, run, "50.0", pause_s=0.2)
    with Tail(stale) as tail:
        tail.wait_for("checkpoint step 2 committed")
        live = CheckpointStore(url, attempt="50.1")
        assert live.claim("50.1") == 2  # the requeued attempt, started elsewhere
        ours = b'{"state": "running", "attempt": "50.1"}\n'
        live.put_aux(STATUS_FILE, ours)
        assert stale.wait(timeout=300) == 1, tail.text()[-3000:]
        tail.thread.join(timeout=30)
        out = tail.text()
    last = [line for line in out.splitlines() if line.startswith("pixpro: ")]
    assert last == [
        "pixpro: attempt 50.1 took over this run (claim 2) from this attempt 50.0 (claim 1); "
        "this attempt stops"
    ], out[-3000:]
    assert "Traceback" not in out and "restart" not in out.lower(), out[-3000:]
    assert live.read_aux(STATUS_FILE) == ours  # the live attempt's status is left alone
    pointer = json.loads((run / "checkpoints" / "latest").read_text())
    assert (pointer["owner"], pointer["generation"]) == ("50.1", 2)

    # the stale job's attempt started once more: refused before it reads anything
    again = run_trainer(spec, run, max_restarts=1, **{ATTEMPT_ENV: "50.0"})
    out = again.stdout + again.stderr
    assert again.returncode == 1, out[-3000:]
    last = [line for line in again.stderr.splitlines() if line.startswith("pixpro: ")]
    assert last == [
        "pixpro: attempt 50.1 took over this run (claim 2) after this attempt 50.0 (claim 1); "
        "this attempt stops"
    ], out[-3000:]
    assert live.read_aux(STATUS_FILE) == ours


def test_a_stale_attempt_that_finds_the_claim_in_its_final_save_neither_completes_nor_requeues(
    tmp_path, data_root
):
    """No checkpoint before the end: the claim is found by the last save, after the last step. The
    attempt must not report completed (nor preempted: its node task would requeue the live job)."""
    spec = write_spec(
        tmp_path / "spec.json",
        tiny_spec(
            data_root, checkpoint__every_steps=None, checkpoint__every_minutes=60, resources__max_restarts=1
        ),
    )
    run = tmp_path / "run"
    stale = _start(spec, run, "60.0", pause_s=0.5)
    with Tail(stale) as tail:
        tail.wait_for("step 1/10")  # claimed, and its status.json says running
        live = CheckpointStore(str(run / "checkpoints"), attempt="60.1")
        assert live.claim("60.1") == 2
        ours = b'{"state": "running", "attempt": "60.1"}\n'
        live.put_aux(STATUS_FILE, ours)
        assert stale.wait(timeout=300) == 1, tail.text()[-3000:]
        tail.thread.join(timeout=30)
        out = tail.text()
    assert "superseded at step 10 of 10" in out and "completed at step" not in out, out[-3000:]
    last = [line for line in out.splitlines() if line.startswith("pixpro: ")]
    took_over = (
        "attempt 60.1 took over this run (claim 2) from this attempt 60.0 (claim 1); this attempt stops"
    )
    assert last == [f"pixpro: {took_over}"], out[-3000:]
    assert live.read_aux(STATUS_FILE) == ours
    assert live.latest() is None  # nothing committed: the claim stands alone


def test_an_attempt_that_cannot_claim_the_run_stops_at_once_in_one_line(tmp_path, data_root):
    """A store that refuses the claim (here ``claims`` is a file, so no record can go below it) fails
    the attempt before it trains: it would otherwise train unfenced."""
    spec = write_spec(tmp_path / "spec.json", tiny_spec(data_root))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "claims").write_text("not a folder\n")
    proc = run_trainer(spec, run)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "could not claim the run for attempt" in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr
    )
    assert "step 1/" not in proc.stderr  # it did not train
