"""Signals and crashes under torchrun (2 ranks, gloo): clean preempted exits, restarts, exact resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch.preempt import EXIT_PREEMPTED, children_of
from tests.trainutil import (
    REPO,
    assert_identical,
    final_state,
    run_trainer,
    tiny_spec,
    trainer_cmd,
    trainer_env,
    write_spec,
)

STEPS = 30


def _spec(data_root: Path, **overrides) -> dict:
    # 24 images, 2 ranks x batch 2: 6 steps an epoch, 30 steps; workers on so their signal handling counts.
    base = {"data__batch_size": 2, "data__num_workers": 2, "optim__epochs": 5, "optim__max_steps": STEPS}
    return tiny_spec(data_root, **(base | overrides))


@pytest.fixture(scope="module")
def golden(tmp_path_factory, data_root):
    d = tmp_path_factory.mktemp("golden")
    spec = write_spec(d / "spec.json", _spec(data_root))
    res = run_trainer(spec, d / "run", nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    return final_state(str(d / "run" / "checkpoints"))


def _launch(spec: Path, run: Path, max_restarts: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        trainer_cmd(spec, run, nproc=2, max_restarts=max_restarts),
        cwd=REPO,
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _current_step(run: Path) -> int:
    step = -1
    for path in (run / "checkpoints" / "metrics").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                step = max(step, json.loads(line)["step"])
    return step


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _current_step(run) < step:
        assert proc.poll() is None, f"trainer ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "trainer too slow"
        time.sleep(0.05)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=["USR2", "TERM"])
def test_signal_to_every_process_commits_exits_preempted_and_resumes_exactly(
    tmp_path, data_root, golden, sig
):
    rng = random.Random(f"{sig.name}-{os.getpid()}")
    stop_after = rng.randint(2, STEPS - 8)
    spec = write_spec(tmp_path / "spec.json", _spec(data_root))
    run = tmp_path / "run"
    proc = _launch(spec, run)
    _wait_for_step(proc, run, stop_after)
    os.killpg(proc.pid, sig)  # like SLURM's --signal: the agent, both ranks and all DataLoader workers
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert _group_members(proc.pid) == [], "stray processes after the preempted exit"
    stopped = final_state(str(run / "checkpoints"))["__step__"]
    assert stop_after <= stopped < STEPS, (stop_after, stopped)

    res = run_trainer(spec, run, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {stopped}" in res.stderr
    assert_identical(golden, final_state(str(run / "checkpoints")))


def test_sigkill_of_one_rank_is_restarted_by_torchrun_from_the_last_checkpoint(tmp_path, data_root, golden):
    spec = write_spec(tmp_path / "spec.json", _spec(data_root))
    run = tmp_path / "run"
    proc = _launch(spec, run, max_restarts=3)
    _wait_for_step(proc, run, 10)
    workers = children_of(proc.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from step" in out
    # The first restart connects: no rank reads a dead rank's address left by the killed round.
    assert "Connection refused" not in out, out[-3000:]
    assert_identical(golden, final_state(str(run / "checkpoints")))


def test_world_size_two_to_one_finishes_the_epoch_with_the_remaining_samples(tmp_path, data_root):
    spec = write_spec(tmp_path / "spec.json", _spec(data_root, optim__max_steps=9))
    run = tmp_path / "run"
    assert run_trainer(spec, run, nproc=2, PIXPRO_STOP_AT_STEP="4").returncode == EXIT_PREEMPTED
    res = run_trainer(spec, run, nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size changed to 1" in res.stderr
    state = final_state(str(run / "checkpoints"))
    sampler = state["train.pt"]["state"]["sampler"]
    # 2 ranks x 2 consume 16 of 24 images in 4 steps; one rank then needs 4 steps of 2 for the other 8
    # (steps 5-8), and step 9 opens epoch 1.
    assert state["train.pt"]["state"]["progress"]["step"] == 9
    assert (sampler["epoch"], sampler["consumed"]) == (1, 2)
