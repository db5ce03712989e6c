"""SLURM kills a preempted job its partition's GraceTime + KillWait after the signal, whatever the job's
``--signal`` lead: the node task reads that window from ``scontrol`` and every preemption budget is
taken within it (the trainers' final save: tests/test_train_uploader.py)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from cluster import slurm
from schemas.contract import preemption_deadlines

SETUP = Path(__file__).resolve().parents[1] / "cluster" / "slurm" / "setup.sh"


def _scontrol(folder: Path, body: str) -> None:
    folder.mkdir()
    path = folder / "scontrol"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_the_budgets_take_the_shorter_of_the_lead_and_the_window() -> None:
    assert preemption_deadlines(120) == (90.0, 110.0)
    assert preemption_deadlines(120, 300) == (90.0, 110.0)  # a long grace: the time limit's lead decides
    assert preemption_deadlines(120, 40) == (30.0, 36.0)  # GraceTime 10 + KillWait 30


def test_the_window_is_the_partitions_grace_time_plus_kill_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scontrol(
        tmp_path / "bin",
        'case "$*" in\n'
        '  "show config") printf "KillWait                = 30 sec\\nMessageTimeout          = 10 sec\\n";;\n'
        '  "-o show partition gpu") echo "PartitionName=gpu PreemptMode=REQUEUE GraceTime=90 Hidden=NO";;\n'
        '  *) echo "Partition $4 not found" >&2; exit 1;;\n'
        "esac",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert slurm.preemption_window("gpu") == (90, 30)
    assert slurm.preemption_window("nope") == (0, 30)  # no grace known: KillWait alone
    assert slurm.preemption_window(None) == (0, 30)


def test_a_silent_scontrol_leaves_the_window_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scontrol(tmp_path / "bin", "exec sleep 300")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    t0 = time.monotonic()
    assert slurm.preemption_window("gpu", timeout_s=0.5) is None
    assert time.monotonic() - t0 < 60  # given up, not waited out: a deadline with a generous cap


@pytest.mark.cluster
def test_the_test_clusters_window_is_what_its_setup_configures() -> None:
    text = SETUP.read_text()
    grace = int(re.search(r"^PartitionName=cpu .*GraceTime=(\d+)", text, re.M)[1])  # type: ignore[index]
    kill_wait = int(re.search(r"^KillWait=(\d+)", text, re.M)[1])  # type: ignore[index]
    assert slurm.preemption_window("cpu") == (grace, kill_wait)
    assert slurm.preemption_window("high") == (0, kill_wait)
