"""A hung rank (SIGSTOP) under two torchrun agents: found by the watchdog, dumped, restarted, exact."""

from __future__ import annotations

import functools
import os
import re
import signal
import time
from pathlib import Path

import pytest

from cluster.nodes import failures as node_failures
from launch.preempt import EXIT_PREEMPTED
from schemas.contract import STEP_PAUSE_ENV, STOP_AT_STEP_ENV
from tests.support.store import local_pointer
from tests.support.trainer import assert_identical, final_state, run_trainer, write_spec
from tests.test_preemption import (  # noqa: F401  (fixtures: the uninterrupted run and its dataset)
    _Agents,
    _current_step,
    _spec,
    _wait_until,
    data_root,
    golden,
    uninterrupted,
)

pytestmark = [pytest.mark.slow]

HANG_TIMEOUT_S = 30  # the minimum the spec accepts
PACE = {STEP_PAUSE_ENV: "0.3"}
"""The ranks sleep this long after each step. The watchdog wakes a stopped rank (SIGCONT) for its stack
dump and kills it :data:`launch.watchdog.DUMP_WAIT_S` later; the 25 steps left must outlast that on an
idle machine too, or the woken rank finishes the run before the kill and there is no restart to see."""


def _hang_line(agents: _Agents, pid: int) -> re.Match[str] | None:
    return re.search(rf"pixpro: hang: rank (\d) on node \S+ \(pid {pid}, stopped\)[^\n]*", agents.output())


def _stop_after_a_commit(agents: _Agents, run: Path, agent: int) -> tuple[int, float]:
    committed = functools.partial(local_pointer, run / "checkpoints")
    _wait_until("a committed step", lambda: _current_step(run) >= 5 and committed(), agents, 180)
    pid = agents.trainer(agent)
    os.kill(pid, signal.SIGSTOP)
    return pid, time.monotonic()


@pytest.mark.parametrize("agent", [1, 0], ids=["second-node", "first-node"])
def test_sigstopped_rank_is_dumped_named_restarted_and_the_run_ends_exact(
    tmp_path,
    data_root,  # noqa: F811  (the uninterrupted run's dataset: the spec hash matches the golden's)
    golden,  # noqa: F811  (the uninterrupted run of tests/test_preemption.py)
    agent,
):
    spec = write_spec(tmp_path / "spec.json", _spec(data_root, resources__hang_timeout_s=HANG_TIMEOUT_S))
    run = tmp_path / "run"
    agents = _Agents(spec, run, "job9.0", max_restarts=1, tee=True, **PACE)
    t_start = time.monotonic()
    pid, t_stop = _stop_after_a_commit(agents, run, agent)
    _wait_until("the hang line", lambda: _hang_line(agents, pid) is not None, agents, 180)
    detected = time.monotonic() - t_stop
    _wait_until("the restart", lambda: "resumed from step" in agents.output(), agents, 180)
    training = time.monotonic() - t_stop
    assert agents.wait(timeout=300) == [0, 0], agents.output()[-4000:]
    total = time.monotonic() - t_start
    match = _hang_line(agents, pid)
    lines = re.findall(r"^pixpro: hang: .*$", agents.output(), re.MULTILINE)
    assert match is not None and len(lines) == 1, agents.output()[-4000:]  # one line, the stopped rank
    assert f"limit {HANG_TIMEOUT_S} s" in match[0] and "since 20" in match[0], match[0]
    # faulthandler's dump of the stopped rank, in its own rank log (torchrun's files by global rank)
    log = (run / "logs" / "job9.0" / f"rank{match[1]}" / "stderr.log").read_text(errors="replace")
    assert "most recent call first" in log and "launch/train.py" in log, log[-3000:]
    assert_identical(golden, final_state(str(run / "checkpoints")))
    # The hung rank's node is blamed once; the ranks the watchdog killed for the restart are not.
    blamed = [(f.node, f.rank, f.cause.split(":")[0]) for f in node_failures(run)]
    assert blamed == [(f"node{agent}", int(match[1]), "hang")], blamed
    print(f"SIGSTOP -> hang line {detected:.1f}s, -> training again {training:.1f}s, job {total:.1f}s")


def test_a_hang_with_no_restarts_left_fails_with_the_line(tmp_path, data_root):  # noqa: F811
    spec = write_spec(tmp_path / "spec.json", _spec(data_root, resources__hang_timeout_s=HANG_TIMEOUT_S))
    run = tmp_path / "run"
    agents = _Agents(spec, run, "job10.0", max_restarts=0, **PACE)
    pid, _ = _stop_after_a_commit(agents, run, 1)
    codes = agents.wait(timeout=300)
    assert codes[1] != 0 and codes[0] != 0, agents.output()[-4000:]
    assert _hang_line(agents, pid) is not None, agents.output()[-4000:]
    assert "pixpro: training failed after a hang: pixpro: hang: rank" in agents.output()


def test_a_checkpoint_read_that_blocks_at_start_up_ends_at_the_start_up_timeout(tmp_path, data_root):  # noqa: F811
    """Every rank blocks outside any collective before its first step (the checkpoint's file on a stalled
    filesystem; here a FIFO nobody writes): the watchdog ends the attempt at
    ``resources.startup_timeout_s`` with its line and stacks, where it used to wait out the time limit."""
    # start-up's limit is never below the hang timeout's: both at their least, 60 s
    limits = {"resources__startup_timeout_s": 60, "resources__hang_timeout_s": HANG_TIMEOUT_S}
    spec = write_spec(tmp_path / "spec.json", _spec(data_root, **limits))
    run = tmp_path / "run"
    first = run_trainer(spec, run, timeout=300, **{STOP_AT_STEP_ENV: "3"})
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-3000:]
    pointer = local_pointer(run / "checkpoints")
    assert pointer is not None
    train_pt = run / "checkpoints" / pointer["prefix"] / "train.pt"
    train_pt.unlink()
    os.mkfifo(train_pt)
    res = run_trainer(spec, run, nproc=2, timeout=300)
    assert res.returncode != 0, res.stderr[-3000:]
    line = re.search(
        r"pixpro: hang: rank \d on node \S+ \(pid \d+\) made no progress since [^\n]*", res.stderr
    )
    assert line and "limit 60 s; last resume at step 0" in line[0], res.stderr[-3000:]
    # the ranks' stacks say where they wait (two ranks dump at once: their lines interleave, not the name)
    assert "load_latest" in res.stderr, res.stderr[-3000:]
