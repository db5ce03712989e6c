"""SLURM kills a preempted job its partition's GraceTime + KillWait after the signal, whatever the job's
``--signal`` lead, and a job at its time limit KillWait after its end: the node task reads both from
``scontrol``, and a preemption's budgets are taken within the window, a time limit's within the lead
(the trainers' final save: tests/test_train_uploader.py)."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import pytest

from cluster import slurm
from schemas.contract import (
    PREEMPT_WINDOW_ENV,
    TERM_WINDOW_ENV,
    TIME_LIMIT_AT_ENV,
    applicable_window,
    preemption_deadlines,
    preemption_window,
)

SETUP = Path(__file__).resolve().parents[1] / "cluster" / "slurm" / "setup.sh"


def _scontrol(folder: Path, body: str) -> None:
    folder.mkdir()
    path = folder / "scontrol"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_the_budgets_take_the_shorter_of_the_lead_and_the_window() -> None:
    assert preemption_deadlines(120) == (90.0, 110.0)
    assert preemption_deadlines(120, 300) == (90.0, 110.0)  # a long grace: the lead decides
    assert preemption_deadlines(120, 40) == (30.0, 36.0)  # GraceTime 10 + KillWait 30


def test_the_time_limits_own_signal_keeps_the_lead() -> None:
    now = 1_000_000.0
    assert applicable_window(40, now + 120, 120, now) is None  # lead before the end: the time limit's
    assert applicable_window(40, now + 170, 120, now) is None  # SLURM may send it up to a minute early
    assert applicable_window(40, now + 3600, 120, now) == 40  # an hour before the end: a preemption
    # the end read at the attempt's start passed long ago: the time limit was raised, this is a preemption
    assert applicable_window(40, now - 600, 120, now) == 40
    assert applicable_window(40, None, 120, now) == 40  # no time limit: only a preemption signals
    assert applicable_window(None, now + 3600, 120, now) is None  # a partition never preempted


def test_a_sigterm_is_bounded_by_its_own_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """``scancel`` and ``scontrol requeue`` kill KillWait after their SIGTERM, sooner than a preemption's
    window or the time limit's lead: a SIGTERM reads its own window, whenever it comes."""
    now = 1_000_000.0
    monkeypatch.setenv(PREEMPT_WINDOW_ENV, "40")
    monkeypatch.setenv(TIME_LIMIT_AT_ENV, str(now + 120))
    assert preemption_window(120, now) is None  # the user signal, lead before the end: the time limit's
    assert preemption_window(120, now, sigterm=True) is None  # a SIGTERM with its window unknown: the lead
    monkeypatch.setenv(TERM_WINDOW_ENV, "5")
    assert preemption_window(120, now, sigterm=True) == 5
    assert preemption_window(120, now - 3600) == 40 and preemption_window(120, now - 3600, True) == 5


def test_kill_times_read_the_partition_the_config_and_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scontrol(
        tmp_path / "bin",
        'case "$*" in\n'
        '  "show config") echo "KillWait = 30 sec"\n'
        '     echo "PreemptType = preempt/${PREEMPT_TYPE:-partition_prio}"\n'
        '     [ -n "$CTLD_PARAMS" ] && echo "SlurmctldParameters = $CTLD_PARAMS";;\n'
        '  "-o show partition gpu") echo "PartitionName=gpu PreemptMode=REQUEUE GraceTime=90 Hidden=NO";;\n'
        '  "-o show partition prio") echo "PartitionName=prio PreemptMode=OFF GraceTime=0 Hidden=NO";;\n'
        '  "-o show job 7") [ "$SLURM_TIME_FORMAT" = standard ] && end=2026-12-07T10:30:00 || end=10:30:00\n'
        '     echo "JobId=7 QOS=long TimeLimit=01:00:00 EndTime=$end Deadline=N/A";;\n'
        '  "-o show job 8") echo "JobId=8 TimeLimit=UNLIMITED EndTime=Unknown Deadline=N/A";;\n'
        '  "-o show job 9") echo "JobId=11 ArrayJobId=9 ArrayTaskId=0 EndTime=2026-12-07T09:00:00"\n'
        '     echo "JobId=9 ArrayJobId=9 ArrayTaskId=2 EndTime=2026-12-07T10:30:00";;\n'
        '  *) echo "$* not found" >&2; exit 1;;\n'
        "esac",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_TIME_FORMAT", "relative")  # the user's own: scontrol is asked for ISO times
    end = datetime.datetime(2026, 12, 7, 10, 30).timestamp()
    assert slurm.kill_times("gpu", "7") == slurm.KillTimes(90, 30, True, end)
    assert slurm.kill_times("gpu", "9") == slurm.KillTimes(90, 30, True, end)  # an array's last task
    assert slurm.kill_times("gpu", "7").window_s == 120  # type: ignore[union-attr]
    # a preemption starts with SIGTERM: a SIGTERM may be one (scancel's, KillWait, cannot be told apart)
    assert slurm.kill_times("gpu", "7").term_window_s == 120  # type: ignore[union-attr]
    assert slurm.kill_times("prio", "8") == slurm.KillTimes(0, 30, False, None)
    assert slurm.kill_times("prio", "8").term_window_s == 30  # type: ignore[union-attr]  # never preempted
    monkeypatch.setenv("CTLD_PARAMS", "enable_configless,preempt_send_user_signal")
    assert slurm.kill_times("gpu", "7") == slurm.KillTimes(90, 30, True, end, user_signal_first=True)
    assert slurm.kill_times("gpu", "7").term_window_s == 30  # type: ignore[union-attr]  # never a preemption's
    monkeypatch.delenv("CTLD_PARAMS")
    assert slurm.kill_times("nope", None) == slurm.KillTimes(0, 30, True, None)  # unknown: KillWait alone
    monkeypatch.setenv("PREEMPT_TYPE", "none")  # nothing is ever preempted: no window
    assert slurm.kill_times("gpu", "7") == slurm.KillTimes(0, 30, False, end)
    monkeypatch.setenv("PREEMPT_TYPE", "qos")  # the job's QOS says when, as sacctmgr knows it
    (tmp_path / "bin" / "sacctmgr").write_text('#!/bin/sh\n[ "$5" = long ] && echo 1-00:05:00 || exit 1\n')
    (tmp_path / "bin" / "sacctmgr").chmod(0o755)
    assert slurm.kill_times("gpu", "7") == slurm.KillTimes(86_700, 30, True, end)
    assert slurm.kill_times("gpu", "8") == slurm.KillTimes(0, 30, False, None)  # no QOS known: the lead


@pytest.mark.timeout(120)  # waited out, the three silent commands would take 300 s
def test_a_silent_scontrol_leaves_them_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scontrol(tmp_path / "bin", "exec sleep 300")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert slurm.kill_times("gpu", "7", timeout_s=0.5) is None
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_our_sleep(p, tmp_path)]


def _is_our_sleep(proc: Path, tmp_path: Path) -> bool:
    """A stand-in scontrol still running: every one asked must be killed, not only the first."""
    try:
        return (
            (proc / "cmdline").read_bytes().startswith(b"sleep\0300")
            and proc.stat().st_uid == os.getuid()
            and (int((proc / "stat").read_text().split()[3]) == os.getpid())
        )
    except (OSError, ValueError, IndexError):
        return False


@pytest.mark.cluster
def test_the_test_clusters_kill_times_are_what_its_setup_configures() -> None:
    text = SETUP.read_text()
    grace = int(re.search(r"^PartitionName=cpu .*GraceTime=(\d+)", text, re.M)[1])  # type: ignore[index]
    kill_wait = int(re.search(r"^KillWait=(\d+)", text, re.M)[1])  # type: ignore[index]
    user_first = re.search(r"^SlurmctldParameters=.*\bpreempt_send_user_signal\b", text, re.M) is not None
    assert slurm.kill_times("cpu", None) == slurm.KillTimes(grace, kill_wait, True, None, user_first)
    assert slurm.kill_times("high", None) == slurm.KillTimes(0, kill_wait, False, None, user_first)
    assert slurm.kill_times("cpu", None).term_window_s == kill_wait  # type: ignore[union-attr]
