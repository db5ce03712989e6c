"""The trainer with its uploader process at a preemption: a SIGTERM while an upload is in flight commits
the final state (the older upload gives way) and the run resumes exactly; a preemption whose checkpoint
cannot commit within the lead time says so in the log and in status.json instead of looking clean."""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest

from launch import heartbeat
from launch.preempt import EXIT_PREEMPTED, children_of
from launch.store import CheckpointStore
from launch.watchdog import BEAT_PREFIX
from schemas.contract import (
    PREEMPT_WINDOW_ENV,
    STATUS_FILE,
    STEP_PAUSE_ENV,
    STOP_AT_STEP_ENV,
    TERM_WINDOW_ENV,
    TIME_LIMIT_AT_ENV,
)
from tests.conftest_s3 import s3_storage_options
from tests.support.procs import wait_for
from tests.support.trainer import (
    Tail,
    assert_identical,
    final_state,
    run_trainer,
    start_ranks,
    start_trainer,
    tiny_spec,
    write_spec,
)

pytestmark = [pytest.mark.slow]


def test_sigterm_while_an_upload_is_in_flight_commits_the_final_state(tmp_path, moto_s3, fault_proxy, s3_url):
    """The run is paced (``STEP_PAUSE_ENV``: a sleep after each step, no change to what it computes) and
    the proxy slowed, so an upload of the 11 MB checkpoint takes seconds while steps go on."""
    data_root = tmp_path / "data"
    longer = {"optim__epochs": 7, "optim__max_steps": 40}
    golden_spec = write_spec(tmp_path / "golden.json", tiny_spec(data_root, **longer))
    assert run_trainer(golden_spec, tmp_path / "golden").returncode == 0
    golden = final_state(str(tmp_path / "golden" / "checkpoints"))

    options = s3_storage_options(moto_s3.endpoint)
    spec = write_spec(
        tmp_path / "spec.json",
        tiny_spec(
            data_root,
            checkpoint__url=s3_url,
            checkpoint__storage_options=s3_storage_options(fault_proxy.url),
            **longer,
        ),
    )
    proc = start_trainer(spec, tmp_path / "run", **{STEP_PAUSE_ENV: "0.3"})
    with Tail(proc) as out:
        wait_for("a first commit", lambda: out.has(" committed in ") or proc.poll() is not None, 180, 0.05)
        store = CheckpointStore(s3_url, options)
        first = store.latest()["step"]
        assert first <= 30, out.text()[-3000:]
        # Every 64 KiB chunk waits 0.03 s: an upload of the 11 MB checkpoint takes 5 s or more however
        # loaded the machine is, against the two steps between its start and the final save.
        fault_proxy.latency(0.03)
        wait_for(
            "an upload under way",
            lambda: out.has(f"step {first + 4}/40") or proc.poll() is not None,
            120,
            0.05,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == EXIT_PREEMPTED, out.text()[-3000:]
        time.sleep(0.2)
        log = out.text()
        assert "abandoned for a newer state" in log, log[-3000:]
        stopped = store.latest()["step"]
        assert stopped > first + 3, log[-3000:]
        status = json.loads(store.read_aux(STATUS_FILE))
        assert status["state"] == "preempted" and status["preempt_committed"] is True
        assert status["last_commit_s"] > 0 and status["committed_step"] == stopped

    fault_proxy.passthrough()
    res = run_trainer(spec, tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {stopped}" in res.stderr
    assert_identical(golden, final_state(s3_url, options))


@pytest.mark.parametrize(
    ("lead", "window", "ends_in", "term"),
    [(10, None, None, None), (60, 10, None, None), (10, 4, 60, None), (60, 40, None, 10)],
    ids=["lead", "partition-window", "time-limit", "sigterm"],
)
def test_a_preemption_that_cannot_commit_in_time_says_so(tmp_path, lead, window, ends_in, term):
    """The uploader hangs (SIGSTOP): the final save gives up commit_s (0.75 x the lead, or x the
    partition's preemption window where that is shorter: SLURM kills a preempted job then, whatever the
    lead; but not the time limit's own signal, lead before the job's end; a SIGTERM's own window, KillWait
    after ``scancel``) after the request, not after the save began (a 2 s step came between), one error
    line says which step was lost, and status.json records it."""
    spec = write_spec(
        tmp_path / "spec.json",
        tiny_spec(
            tmp_path / "data", resources__signal_lead_s=lead, **{"optim__epochs": 7, "optim__max_steps": 40}
        ),
    )
    run = tmp_path / "run"
    # the request at step 6, as a signal would make it; then 2 s pass before the step boundary
    env = {STOP_AT_STEP_ENV: "6", STEP_PAUSE_ENV: "2"} if term is None else {STEP_PAUSE_ENV: "2"}
    if term:  # the request is a real SIGTERM, sent once the uploader hangs
        env[TERM_WINDOW_ENV] = str(term)
    if window:
        env[PREEMPT_WINDOW_ENV] = str(window)
    if ends_in:  # the signal comes within the lead (+ SLURM's minute) of the job's end: the time limit's
        env[TIME_LIMIT_AT_ENV] = str(int(time.time() + ends_in))
    proc = start_trainer(spec, run, **env)
    with Tail(proc) as out:
        wait_for("a first commit", lambda: out.has(" committed in ") or proc.poll() is not None, 180, 0.05)
        assert proc.poll() is None and not out.has("step 6/40"), out.text()[-3000:]
        (uploader,) = children_of(proc.pid)  # num_workers 0: the uploader is the trainer's only child
        os.kill(uploader, signal.SIGSTOP)
        if term:
            proc.send_signal(signal.SIGTERM)
        # gives up at commit_s = 7.5 s after the request, then exits (benches/bench_deadlines.py)
        proc.wait(timeout=120)
        log = out.text()
        (line,) = [x for x in log.splitlines() if "but its checkpoint did not commit within 8 s" in x]
        left = float(re.search(r"\(([0-9.]+) s were left when the save began", line)[1])  # type: ignore[index]
        assert 0 <= left <= (7.5 if term else 7.5 - 2), line  # a SIGTERM may come within the last step
        applies = window and not ends_in
        said = f", SIGTERM window {term} s" if term else f", preemption window {window} s" if applies else ")"
        assert f"resources.signal_lead_s {lead}{said}" in line, line
        store = CheckpointStore(str(run / "checkpoints"))
        committed = store.latest()["step"]
        assert f"the next attempt resumes from step {committed}" in line
        status = json.loads(store.read_aux(STATUS_FILE))
        assert status["state"] == "preempted" and status["preempt_committed"] is False
        assert status["step"] > committed


def test_a_sigterm_that_reached_one_rank_sets_every_ranks_budget(tmp_path):
    """SLURM's signal reaches the ranks with some skew, and the ranks agree on the stop before every one
    has its own: the agreement carries the SIGTERM, so rank 0, which commits and was never signalled,
    budgets the SIGTERM's window (10 s: 7.5 s) and not the preemption's (40 s: 30 s)."""
    spec = write_spec(
        tmp_path / "spec.json",
        tiny_spec(tmp_path / "data", resources__signal_lead_s=60, optim__epochs=20, optim__max_steps=40),
    )
    env = {STEP_PAUSE_ENV: "2", TERM_WINDOW_ENV: "10", PREEMPT_WINDOW_ENV: "40"}
    proc = start_ranks(spec, tmp_path / "run", **env)
    with Tail(proc) as out:
        wait_for("a first commit", lambda: out.has(" committed in ") or proc.poll() is not None, 180, 0.05)
        ranks = {_rank_of(pid, proc.pid): pid for pid in children_of(proc.pid)}
        assert sorted(ranks) == [0, 1], out.text()[-3000:]
        (uploader,) = children_of(ranks[0])  # num_workers 0: the uploader is the rank's only child
        os.kill(uploader, signal.SIGSTOP)
        os.kill(ranks[1], signal.SIGTERM)
        assert proc.wait(timeout=120) == EXIT_PREEMPTED, out.text()[-3000:]
        lines = [x for x in out.text().splitlines() if "but its checkpoint did not commit within" in x]
        assert lines and all("within 8 s" in x and "SIGTERM window 10 s" in x for x in lines), lines


def _rank_of(pid: int, agent: int) -> int:
    """A rank's number, from its agent's heartbeat folder (a forked rank's /proc environ is the agent's)."""
    for path in Path(tempfile.gettempdir()).glob(f"{BEAT_PREFIX}{agent}-*/rank*.beat"):
        if (heartbeat.read(str(path)) or {}).get("pid") == pid:
            return int(path.stem.removeprefix("rank"))
    raise AssertionError(f"pid {pid} has no heartbeat under agent {agent}")
