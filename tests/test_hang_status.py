"""``pixpro status`` from the login node: a RUNNING run whose newest heartbeat is older than its hang
timeout is STALLED, with the age; torch-free, from the run folder's ``heartbeats/<node>.json`` files."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from cluster.attempts import AttemptState
from cluster.status import stalled
from schemas.contract import NodeHeartbeat, RankBeat, RunPaths
from tests.support.runs import fake_run


def _beat(
    run_dir: str, node: str, age_s: float, limit_s: float | None, now: float, updated_age_s: float = 0
) -> None:
    ranks = [
        RankBeat(rank=r, pid=100 + r, step=10, phase="train", time=now - age_s - r, limit_s=limit_s)
        for r in range(2)
    ]
    path = RunPaths(run_dir).heartbeat(node)
    path.parent.mkdir(parents=True, exist_ok=True)
    beat = NodeHeartbeat(node=node, updated=now - updated_age_s, ranks=ranks)
    path.write_text(beat.model_dump_json())


def test_running_run_with_an_old_heartbeat_is_stalled_with_its_age(tmp_path: Path) -> None:
    rec = fake_run(tmp_path, 1)
    now = time.time()
    running = AttemptState("RUNNING", "", None, ("X",))
    assert stalled(rec, running, now) == (running, None)  # no heartbeat yet: nothing to say
    _beat(rec.run_dir, "a-1", age_s=20, limit_s=30, now=now)
    assert stalled(rec, running, now) == (running, 20.0)  # young enough: the newest rank counts
    _beat(rec.run_dir, "b-2", age_s=95, limit_s=30, now=now)
    assert stalled(rec, running, now) == (running, 20.0)  # one node progressing is progress
    _beat(rec.run_dir, "a-1", age_s=45, limit_s=30, now=now)
    st, age = stalled(rec, running, now)
    assert (st.state, st.reason, st.history, age) == (
        "STALLED",
        "no progress for 45 s, hang timeout 30 s",
        ("X",),
        45.0,
    )
    assert st.active  # still holds its nodes


def test_only_running_and_armed_heartbeats_stall(tmp_path: Path) -> None:
    rec = fake_run(tmp_path, 1)
    now = time.time()
    _beat(rec.run_dir, "a-1", age_s=900, limit_s=None, now=now)  # before the first step: not armed
    assert stalled(rec, AttemptState("RUNNING"), now)[0].state == "RUNNING"
    _beat(rec.run_dir, "a-1", age_s=900, limit_s=300, now=now)
    for ended in ("COMPLETED", "FAILED", "PENDING"):  # a heartbeat left behind says nothing then
        assert stalled(rec, AttemptState(ended), now)[0].state == ended
    RunPaths(rec.run_dir).heartbeat("torn").write_text('{"node": "torn", "upd')  # a half-written file
    assert stalled(rec, AttemptState("RUNNING"), now)[0].state == "STALLED"


def test_status_modules_stay_torch_free() -> None:
    code = "import sys, cluster.status, cluster.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_an_earlier_attempts_heartbeat_does_not_stall_a_starting_attempt(tmp_path: Path) -> None:
    rec = fake_run(tmp_path, 1)
    now = time.time()
    _beat(rec.run_dir, "old-1", age_s=900, limit_s=300, now=now, updated_age_s=890)  # its agent is gone
    assert stalled(rec, AttemptState("RUNNING"), now)[0].state == "STALLED"  # all agents silent: stalled
    path = RunPaths(rec.run_dir).heartbeat("new-2")  # the new attempt's agent, no rank beat yet
    path.write_text(NodeHeartbeat(node="new-2", updated=now, ranks=[]).model_dump_json())
    assert stalled(rec, AttemptState("RUNNING"), now)[0].state == "RUNNING"
