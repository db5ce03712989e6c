"""The hang watchdog's decisions, with ``sleep`` processes as ranks and hand-written heartbeats: which
rank is the hung one, who acts, what is killed; its limits against the collectives' timeout. No torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import heartbeat
from launch.checkpoint import FINAL_FLUSH_S
from launch.collectives import collective_timeout_s
from launch.node_failures import RECORDER
from launch.watchdog import BEAT_PREFIX, DUMP_WAIT_S, POLL_S, Watchdog, run_dir_of, stopped
from schemas.contract import NodeHeartbeat, RankBeat, RunPaths
from tests.support.procs import wait_for


@pytest.fixture
def ranks() -> Iterator[list[subprocess.Popen]]:
    """Two workers of this process that, like a trainer, survive the dump signal."""
    ignore_dump = f"trap '' {int(heartbeat.DUMP_SIGNAL)}; echo ready; exec sleep 120"
    procs = [
        subprocess.Popen(["bash", "-c", ignore_dump], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for p in procs:  # the trap is set before the test signals them
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    yield procs
    for p in procs:
        p.kill()
        p.wait()
        p.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def dog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Watchdog]:
    monkeypatch.delenv(heartbeat.DIR_ENV, raising=False)
    w = Watchdog(tmp_path / "run", node="here")
    (tmp_path / "run" / "heartbeats").mkdir(parents=True)
    yield w
    w.stop()


def _write(dog: Watchdog, rank: int, pid: int, step: int, age_s: float, limit_s: float | None) -> None:
    rec = {"rank": rank, "pid": pid, "step": step, "phase": "train", "time": time.time() - age_s}
    Path(heartbeat.rank_file(dog.dir, rank)).write_text(json.dumps(rec | {"limit_s": limit_s}))


def test_the_rank_with_the_least_progress_is_hung_and_a_stopped_one_first(dog, ranks) -> None:
    now = time.time()
    _write(dog, 0, ranks[0].pid, step=7, age_s=40, limit_s=30)
    _write(dog, 1, ranks[1].pid, step=6, age_s=45, limit_s=30)
    hung = dog.check(now)
    assert hung is not None and (hung.rank, hung.stopped) == (1, False)
    os.kill(ranks[0].pid, signal.SIGSTOP)  # delivered asynchronously: wait until the kernel shows it
    wait_for("rank 0 to stop", lambda: stopped(ranks[0].pid), 30, 0.01)
    hung = dog.check(now)
    assert hung is not None and (hung.rank, hung.stopped) == (0, True)
    dog.share()  # published for the login node and the other agents
    beat = NodeHeartbeat.model_validate_json(RunPaths(dog.run_dir).heartbeat("here").read_bytes())
    assert sorted(r.rank for r in beat.ranks) == [0, 1]


def test_unarmed_or_young_beats_and_other_processes_are_no_hang(dog, ranks) -> None:
    now = time.time()
    _write(dog, 0, ranks[0].pid, step=0, age_s=900, limit_s=None)  # before the first step
    _write(dog, 1, ranks[1].pid, step=3, age_s=10, limit_s=30)
    _write(dog, 2, 1, step=1, age_s=900, limit_s=30)  # pid 1: not a worker of this agent
    assert dog.check(now) is None


def test_only_the_hung_ranks_agent_acts_until_twice_the_limit(dog, ranks) -> None:
    now = time.time()
    _write(dog, 0, ranks[0].pid, step=7, age_s=40, limit_s=30)
    other = RankBeat(rank=1, pid=99999, step=6, phase="train", time=now - 45, limit_s=30, stopped=True)
    path = RunPaths(dog.run_dir).heartbeat("there")
    path.write_text(NodeHeartbeat(node="there", updated=now, ranks=[other]).model_dump_json())
    dog.share()
    assert dog.check(now) is None  # the stopped rank is on "there": its agent acts
    _write(dog, 0, ranks[0].pid, step=7, age_s=61, limit_s=30)
    hung = dog.check(now)
    assert hung is not None and hung.rank == 0  # "there" did nothing for twice the limit


def test_a_hang_found_elsewhere_dumps_and_stops_this_nodes_workers_of_that_round(dog, ranks) -> None:
    now = time.time()
    _write(dog, 0, ranks[0].pid, step=7, age_s=40, limit_s=30)
    _write(dog, 1, ranks[1].pid, step=0, age_s=-5, limit_s=None)  # a newer round's worker
    line = "pixpro: hang: rank 3 on node there ..."
    path = RunPaths(dog.run_dir).heartbeat("there")
    path.write_text(
        NodeHeartbeat(node="there", updated=now, ranks=[], hang=line, hang_at=now).model_dump_json()
    )
    dog.share()
    assert dog.check(now) is None
    assert ranks[0].wait(timeout=30) == -signal.SIGKILL  # dumped (ignored here), then killed
    assert ranks[1].poll() is None and dog.last_hang == line


def test_run_dir_comes_from_the_trainer_arguments() -> None:
    assert run_dir_of(["spec.json", "--run-dir", "/r/x"]) == Path("/r/x")
    assert run_dir_of(["spec.json", "--run-dir=/r/y"]) == Path("/r/y")
    assert run_dir_of([]) is None


def test_a_dumped_rank_that_dies_before_the_kill_is_not_blamed_on_the_node(
    dog, ranks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Woken by the dump, a hung rank may die on its own (a crash in its dump) in the two seconds before
    the watchdog's SIGKILL: its hang is recorded once, its death is the watchdog's doing."""
    seen: list[tuple[int, str]] = []
    monkeypatch.setattr(RECORDER, "record", lambda rank, cause: seen.append((rank, cause)))
    _write(dog, 0, ranks[0].pid, step=7, age_s=40, limit_s=30)
    dog.dump(dog.local_ranks())
    RECORDER.failed({0: SimpleNamespace(pid=ranks[0].pid, local_rank=0, exitcode=-signal.SIGSEGV)}, {})
    assert seen == []


def test_a_run_folder_that_blocks_does_not_keep_the_hung_rank_alive(dog, ranks) -> None:
    """A write into the shared run folder blocks (a stalled parallel filesystem; here a FIFO where the
    node's file is written): the folder's thread waits in it, the decisions and the kill go on."""
    fifo = RunPaths(dog.run_dir).heartbeat("here").with_suffix(f".tmp{os.getpid()}")
    os.mkfifo(fifo)
    _write(dog, 0, ranks[0].pid, step=7, age_s=40, limit_s=30)
    dog.start()
    try:
        assert ranks[0].wait(timeout=60) == -signal.SIGKILL  # dumped (ignored here), then killed
        assert dog._sharer.is_alive() and "hang: rank 0" in (dog.last_hang or "")
        with dog._lock:
            assert [rank for rank, _ in dog._records] == [0]  # recorded once the folder answers
            dog._records.clear()  # not here: this test's node is no real node
    finally:
        with open(fifo, "rb"):  # let the blocked write end, so the thread can stop
            pass


def test_a_node_gone_silent_is_given_twice_the_limit_before_this_node_acts(dog, ranks) -> None:
    """Another node's agent stopped writing its file (its run folder stalled, or it died): its ranks may
    be the hung ones, so this node acts on its own only at twice the limit."""
    now = time.time()
    path = RunPaths(dog.run_dir).heartbeat("there")
    path.write_text(NodeHeartbeat(node="there", updated=now, ranks=[]).model_dump_json())
    dog.share()
    assert dog.check(now) is None  # heard from "there"
    path.write_text(NodeHeartbeat(node="there", updated=now - 40, ranks=[]).model_dump_json())
    dog.share()
    _write(dog, 0, ranks[0].pid, step=7, age_s=45, limit_s=30)
    assert dog.check(now) is None
    _write(dog, 0, ranks[0].pid, step=7, age_s=61, limit_s=30)
    hung = dog.check(now)
    assert hung is not None and hung.rank == 0


def test_a_killed_agents_heartbeat_folder_is_removed_by_the_next_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(heartbeat.DIR_ENV, raising=False)
    dead = tmp_path / f"{BEAT_PREFIX}999999999-abc"  # above any pid_max: no such process
    alive = tmp_path / f"{BEAT_PREFIX}{os.getpid()}-def"  # this process: an agent still running
    for path in (dead, alive):
        path.mkdir()
        (path / "rank0.beat").write_text("{}")
    dog = Watchdog(tmp_path / "run", node="here")
    try:
        assert not dead.exists() and alive.exists() and Path(dog.dir).parent == tmp_path
    finally:
        dog.stop()


def test_a_hang_published_long_ago_is_not_joined_again(dog, ranks) -> None:
    """The line stays in its agent's file; an agent that reads it only now (its folder was stalled) must
    not stop the healthy ranks of the round that restarted since."""
    now = time.time()
    _write(dog, 0, ranks[0].pid, step=0, age_s=100, limit_s=1800)  # a new round, starting
    line = "pixpro: hang: rank 3 on node there ..."
    path = RunPaths(dog.run_dir).heartbeat("there")
    beat = NodeHeartbeat(node="there", updated=now, ranks=[], hang=line, hang_at=now - 120)
    path.write_text(beat.model_dump_json())
    dog.share()
    assert dog.check(now) is None and dog.last_hang is None and ranks[0].poll() is None


@pytest.mark.parametrize("cut_off", [False, True], ids=["reads-the-folder", "cut-off"])
def test_a_hang_found_cut_off_from_the_folder_is_not_blamed_on_the_node(
    dog, ranks, monkeypatch: pytest.MonkeyPatch, cut_off: bool
) -> None:
    """Cut off from the shared folder, every node finds its own ranks stalled: each restarts, none is
    recorded as the node's fault (a filesystem stall would otherwise leave every node of the run out)."""
    seen: list[tuple[int, str]] = []
    monkeypatch.setattr(RECORDER, "record", lambda rank, cause: seen.append((rank, cause)))
    monkeypatch.setattr("launch.watchdog.DUMP_WAIT_S", 0.0)
    now = time.time()
    if cut_off:
        dog._shared_at = now - 60
    _write(dog, 0, ranks[0].pid, step=7, age_s=40, limit_s=30)
    hung = dog.check(now)
    assert hung is not None
    dog.act(hung, now)
    assert ranks[0].wait(timeout=30) == -signal.SIGKILL
    dog.share()
    assert [rank for rank, _ in seen] == ([] if cut_off else [0])


@pytest.mark.parametrize(("hang", "startup"), [(300, 1800), (600, 60), (3600, 1800)])
def test_every_collective_outlasts_every_heartbeat_limit(tmp_path: Path, hang: int, startup: int) -> None:
    """The watchdog acts (poll, stacks, kill) before any collective times out: a limit reached by a rank
    in start-up, between steps or in its final flush leaves the collectives waiting on it time."""
    beat = heartbeat.Heartbeat(str(tmp_path), 0, hang, startup)
    limits = []
    for step, phase, own in (
        (0, "resume", None),
        (1, "train", None),
        (2, "train", None),
        (2, "final-flush", FINAL_FLUSH_S),
    ):
        beat.beat(step, phase, own)
        limits.append((heartbeat.read(heartbeat.rank_file(str(tmp_path), 0)) or {})["limit_s"])
    assert limits[:3] == [max(startup, hang), max(startup, hang), hang]
    timeout = collective_timeout_s(FINAL_FLUSH_S, 45, hang, startup)
    assert all(timeout >= limit + POLL_S + DUMP_WAIT_S + 1 for limit in limits), (timeout, limits)
