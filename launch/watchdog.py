"""The hang watchdog: a thread in each node's torchrun agent (:mod:`launch.run`), outside every rank.

torchrun restarts only workers that exit; a rank that is stopped, stuck in a collective or in a driver
call is alive, and the others wait in their next collective until the process group's timeout. Here
the agent reads its ranks' heartbeat files (:mod:`launch.heartbeat`) every second, and publishes them
to the run folder (read by the other agents and ``pixpro status``) every 5 s. When an armed rank
made no progress for longer than its limit (``resources.hang_timeout_s``, or a phase's own deadline):

1. the hung rank is chosen over all nodes (each agent publishes its ranks to the run folder's
   ``heartbeats/<node>.json``): a stopped process first, else the one with the least progress (step,
   then time). Only that rank's agent acts, so one line names one rank; every agent acts on its own
   stale ranks once they are twice over the limit (that node's agent may be gone);
2. it prints one line (which rank, which node, since when), sends every local rank SIGCONT (a stopped
   process cannot run a handler) and :data:`launch.heartbeat.DUMP_SIGNAL` (``faulthandler`` writes
   every thread's stack to the rank log), and publishes the line: the other nodes' agents dump their
   ranks' stacks too, and stop them (:meth:`Watchdog.join_restart`);
3. it SIGKILLs the local ranks. torchrun sees failed workers and restarts the group in a new rendezvous
   round from the last committed checkpoint (one of ``max_restarts`` on every node); the other nodes'
   agents do the same with their killed workers (and :mod:`launch.elastic` kills what is left of a
   broken group at once). With no restarts left, the agent fails and :mod:`launch.run` repeats the
   line.

The run folder is on a shared filesystem, and a stalled one (what stalls the ranks, often) blocks a
write rather than failing it. So the folder's side, publishing this node's file, reading the others'
and recording failures, runs in a thread of its own (:meth:`Watchdog.share`); the decisions and the
kills use node-local files and what that thread last read. An agent that cannot read the folder for
:data:`FRESH_S` decides on its own ranks alone; one that reads it, while another node's agent it saw has
gone silent, waits twice the limit before it acts on its own (the silent node's ranks may be the hung
ones).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from launch.heartbeat import DIR_ENV, DUMP_SIGNAL, read
from launch.node_failures import RECORDER
from launch.preempt import children_of
from schemas.contract import NodeHeartbeat, RankBeat, RunPaths

POLL_S = 1.0
PUBLISH_S = 5.0  # how often the node's heartbeat reaches the run folder, and others' are read
DUMP_WAIT_S = 3.0  # time the ranks get to write their stacks before they are killed
FRESH_S = 30.0  # another node's file older than this is a gone agent's: not compared against


BEAT_PREFIX = "pixpro-beat-"  # + the agent's pid: a SIGKILLed agent's folder is known as such


def _remove_gone_agents_folders() -> None:
    """The heartbeat folders that agents killed outright left in the temporary folder (stop() never ran)."""
    for path in Path(tempfile.gettempdir()).glob(f"{BEAT_PREFIX}*-*"):
        pid = path.name[len(BEAT_PREFIX) :].split("-", 1)[0]
        with contextlib.suppress(OSError, ValueError):
            if path.stat().st_uid == os.getuid() and not Path(f"/proc/{int(pid)}").exists():
                shutil.rmtree(path, ignore_errors=True)


def stopped(pid: int) -> bool:
    """Whether the kernel shows ``pid`` stopped (SIGSTOP, or a tracer's stop)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Watchdog:
    """Started by the agent before torchrun; sets :data:`launch.heartbeat.DIR_ENV` for the workers."""

    def __init__(self, run_dir: Path | None, node: str | None = None) -> None:
        self.run_dir = run_dir
        self.host = socket.gethostname()
        self.node = node or f"{self.host}-{os.getpid()}"
        _remove_gone_agents_folders()
        self.dir = tempfile.mkdtemp(prefix=f"{BEAT_PREFIX}{os.getpid()}-")
        os.environ[DIR_ENV] = self.dir  # workers inherit os.environ
        self.last_hang: str | None = None
        self._seen: set[str] = set()
        self._killed: set[int] = set()
        # shared with the folder's thread, under the lock: what to publish and what it last read
        self._lock = threading.Lock()
        self._local: list[RankBeat] = []
        self._hang: tuple[str, float] | None = None  # the line this agent published, and when it acted
        self._records: list[tuple[int, str]] = []
        self._others: list[NodeHeartbeat] = []
        self._shared_at = time.time()  # when the folder last answered
        self._heard: set[str] = set()  # other nodes whose file this agent saw fresh
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pixpro-watchdog", daemon=True)
        self._sharer = threading.Thread(target=self._share_loop, name="pixpro-watchdog-share", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        self._sharer.start()
        return self

    def stop(self) -> None:
        """Stop both threads; the folder's thread records what is pending and removes this node's file,
        given 10 s (a stalled folder keeps it, not the agent)."""
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._sharer):
            if thread.is_alive():
                thread.join(timeout=10)
        if not self._sharer.is_alive() and self._sharer.ident is None:  # never started: leave here
            self._leave()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- reading ------------------------------------------------------------------------------------
    def local_ranks(self) -> list[RankBeat]:
        """This node's live workers' newest beats (a killed or exited worker's file is ignored)."""
        alive = set(children_of(os.getpid())) - self._killed
        out = []
        for name in sorted(os.listdir(self.dir)):
            rec = read(os.path.join(self.dir, name))
            if rec is not None and rec.get("pid") in alive:
                with contextlib.suppress(ValueError):
                    out.append(RankBeat.model_validate(rec | {"stopped": stopped(rec["pid"])}))
        return out

    def read_others(self) -> list[NodeHeartbeat]:
        """The other nodes' files in the run folder (may block: the folder's thread only)."""
        if self.run_dir is None:
            return []
        out = []
        for path in RunPaths(self.run_dir).heartbeats.glob("*.json"):
            if path.stem == self.node:
                continue
            with contextlib.suppress(OSError, ValueError):
                out.append(NodeHeartbeat.model_validate_json(path.read_bytes()))
        return out

    def share(self) -> None:
        """The run folder's side, in its own thread: record the failures found, publish this node's ranks
        (and hang line), read the other nodes' files."""
        self._record_failures()
        with self._lock:
            local, hang = self._local, self._hang
        self.publish(local, hang)
        others = self.read_others()
        with self._lock:
            self._others, self._shared_at = others, time.time()

    def _record_failures(self) -> None:
        with self._lock:
            records, self._records = self._records, []
        for rank, cause in records:
            RECORDER.record(rank, cause)

    def _cut_off(self, now: float) -> bool:
        """The run folder has not answered for :data:`FRESH_S`: this node's ranks decide alone."""
        with self._lock:
            return now - self._shared_at > FRESH_S

    def _leave(self) -> None:
        self._record_failures()
        if self.run_dir is not None:
            with contextlib.suppress(OSError):
                RunPaths(self.run_dir).heartbeat(self.node).unlink()

    def _share_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(PUBLISH_S)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._guarded(self.share)
        self._guarded(self._leave)

    def publish(self, ranks: list[RankBeat], hang: tuple[str, float] | None = None) -> None:
        if self.run_dir is None:
            return
        path = RunPaths(self.run_dir).heartbeat(self.node)
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            line, at = hang or (None, None)
            beat = NodeHeartbeat(node=self.node, updated=time.time(), ranks=ranks, hang=line, hang_at=at)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(beat.model_dump_json())
            os.replace(tmp, path)

    # --- acting -------------------------------------------------------------------------------------
    def dump(self, ranks: list[RankBeat]) -> None:
        """Every local rank's stacks to its log: SIGCONT first, a stopped process runs no handler. From
        here on the watchdog is why these ranks end (it kills them after the dump; a woken rank may also
        die on its own before that): none of them is recorded against the node again."""
        for r in ranks:
            RECORDER.ignore(r.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(r.pid, signal.SIGCONT)
                os.kill(r.pid, DUMP_SIGNAL)

    def check(self, now: float) -> RankBeat | None:
        """The hung rank this agent must act on now, if any: from node-local files and what the folder's
        thread last read, never from the run folder itself."""
        local = self.local_ranks()
        stale = [r for r in local if r.limit_s is not None and now - r.time > r.limit_s]
        with self._lock:
            self._local, known = local, self._others
        if stale:
            self._wake.set()  # publish the stale ranks now, not at the next PUBLISH_S
        others = [n for n in known if now - n.updated < FRESH_S]
        self._heard.update(n.node for n in others)
        for node in others:  # a hang that old was joined or restarted long ago: its round is gone
            if node.hang and node.hang not in self._seen and now - (node.hang_at or 0) < FRESH_S:
                self._seen.add(node.hang)
                self.join_restart(node, local)
                return None
        if not stale:
            return None
        silent = not self._cut_off(now) and any(n.node in self._heard for n in known if n not in others)
        everyone = local + [r for node in others for r in node.ranks]
        culprit = min(everyone, key=lambda r: (not r.stopped, r.step, r.time))
        if culprit in local and not silent:
            return culprit
        overdue = [r for r in stale if now - r.time > 2 * (r.limit_s or 0)]
        return min(overdue, key=lambda r: (not r.stopped, r.step, r.time)) if overdue else None

    def join_restart(self, node: NodeHeartbeat, local: list[RankBeat]) -> None:
        """Another node's agent found a hung rank: dump this node's stacks, then stop its workers of the
        hung round, so torchrun restarts here at once too. A rank that sees its peer die may hang in its
        own exit (seen here: 30 s after "Connection reset by peer"); workers of a newer round, started
        after the hang was published, are left alone."""
        print(
            f"pixpro: node {node.node} found a hung rank; this node's stacks go to its rank logs and its "
            "workers stop for the restart",
            file=sys.stderr,
            flush=True,
        )
        self.last_hang = node.hang  # with no restarts left, this node fails for the same reason
        self.dump(local)
        time.sleep(DUMP_WAIT_S)
        self._kill([r for r in local if r.time <= (node.hang_at or node.updated)])

    def _kill(self, ranks: list[RankBeat]) -> None:
        for r in ranks:
            self._killed.add(r.pid)  # dumped first, so not recorded against the node (see dump)
            with contextlib.suppress(ProcessLookupError):
                os.kill(r.pid, signal.SIGKILL)

    def act(self, hung: RankBeat, now: float) -> None:
        local = self.local_ranks()
        line = (
            f"pixpro: hang: rank {hung.rank} on node {self.host} (pid {hung.pid}"
            f"{', stopped' if hung.stopped else ''}) made no progress since {_utc(hung.time)} "
            f"({now - hung.time:.1f} s, limit {hung.limit_s:g} s; last {hung.phase} at step {hung.step}); "
            "every rank's stack is in its log; killing this node's workers (torchrun restarts them "
            "from the last committed checkpoint if restarts are left)"
        )
        print(line, file=sys.stderr, flush=True)
        self.last_hang = line
        self._seen.add(line)
        cause = f"hang: no progress for {now - hung.time:.0f} s in {hung.phase} at step {hung.step}"
        # cut off from the folder, every node finds its own ranks stalled (the filesystem they share, more
        # likely than this node): the restart, but no node's fault on record
        blame = not self._cut_off(now)
        with self._lock:  # the folder's thread records and publishes them (the others' agents join)
            self._records += [(hung.rank, cause)] if blame else []
            self._local, self._hang = local, (line, now)
        self._wake.set()
        self.dump(local)
        time.sleep(DUMP_WAIT_S)
        self._kill(local)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self._guarded(self._tick)

    def _tick(self) -> None:
        now = time.time()
        hung = self.check(now)
        if hung is not None:
            self.act(hung, now)

    @staticmethod
    def _guarded(work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # the watchdog must never take the agent down
            print(f"pixpro: watchdog error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def run_dir_of(trainer_args: list[str]) -> Path | None:
    """The trainer's ``--run-dir`` (default ``runs/<spec name>``, as :mod:`launch.train` picks it)."""
    for i, arg in enumerate(trainer_args):
        if arg == "--run-dir" and i + 1 < len(trainer_args):
            return Path(trainer_args[i + 1])
        if arg.startswith("--run-dir="):
            return Path(arg.split("=", 1)[1])
    spec = next((a for a in trainer_args if not a.startswith("-")), None)
    if spec is None:
        return None
    try:
        from schemas import load_spec

        return Path("runs") / load_spec(Path(spec)).name
    except Exception:
        return None
