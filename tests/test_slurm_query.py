"""``pixpro status``'s SLURM query without a cluster: stand-in ``squeue``/``sacct`` scripts on PATH show
that both commands run side by side and that a silent one is killed and reported, not waited for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster import slurm


def _commands(folder: Path, squeue: str, sacct: str) -> None:
    folder.mkdir()
    for name, body in (("squeue", squeue), ("sacct", sacct)):
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)


def test_squeue_and_sacct_run_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """squeue answers only once sacct has started (it gives up after 60 s): asked one after the other, as
    before, squeue would fail and the job would read as unanswered."""
    started = tmp_path / "sacct-started"
    _commands(
        tmp_path / "bin",
        squeue=f"for i in $(seq 600); do [ -e {started} ] && exit 0; sleep 0.1; done; "
        "echo 'error: sacct never started' >&2; exit 1",
        sacct=f"touch {started}; echo '7|COMPLETED|0:0|2026-01-01T00:00:00|2026-01-01T01:00:00'",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    jobs, warnings = slurm.query(["7"])
    assert warnings == []
    assert jobs["7"].unanswered == ()
    assert [h.state for h in jobs["7"].history] == ["COMPLETED"]


def test_a_silent_command_is_killed_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pids = tmp_path / "sacct.pid"
    _commands(tmp_path / "bin", squeue="exit 0", sacct=f"echo $$ > {pids}; exec sleep 600")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "TIMEOUT_S", 1)
    jobs, warnings = slurm.query(["7"])
    assert warnings == ["sacct failed: sacct did not answer within 1s: is slurmctld up?"]
    assert jobs["7"].unanswered == ("sacct",)
    pid = int(pids.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(pid, 0)


def test_status_waits_for_slurm_no_longer_than_its_own_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pixpro status`` with the controller down lists the runs, their SLURM state UNKNOWN, after
    ``STATUS_TIMEOUT_S`` (SLURM's MessageTimeout, 10 s; 1 s here), not the minute a resume or a cancel
    waits."""
    from cluster.status import collect
    from tests.support.runs import fake_run

    _commands(tmp_path / "bin", squeue="exec sleep 600", sacct="exec sleep 600")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("cluster.status.STATUS_TIMEOUT_S", 1.0)
    record = fake_run(tmp_path / "home", 0)  # run 0 is a SLURM run
    rows, warnings = collect([record])
    assert rows[0]["state"] == "UNKNOWN", rows[0]
    assert warnings[:2] == [
        f"{c} failed: {c} did not answer within 1s: is slurmctld up?" for c in ("squeue", "sacct")
    ]


def test_a_missing_command_is_a_failed_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    jobs, warnings = slurm.query(["7"])
    assert warnings == [
        "squeue failed: squeue not found: is this a SLURM login node?",
        "sacct failed: sacct not found: is this a SLURM login node?",
    ]
    assert jobs["7"].unanswered == ("squeue", "sacct")


def test_a_command_that_cannot_run_is_a_failed_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``squeue`` on PATH that is not executable: a one-line warning, not a traceback."""
    _commands(tmp_path / "bin", squeue="exit 0", sacct="exit 0")
    (tmp_path / "bin" / "squeue").chmod(0o644)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    jobs, warnings = slurm.query(["7"])
    assert warnings == ["squeue failed: squeue cannot be run: Permission denied"]
    assert jobs["7"].unanswered == ("squeue",)
