"""The checkpoint uploader: a long-lived process per rank that serializes, hashes, uploads and commits.

Why a process: serializing and uploading a ResNet-50 state on a thread of the trainer cost 4.6-9.2 % of
training time (the GIL and the cores it shares with the loop). Here the trainer only copies tensors into
shared memory (:mod:`launch.snapshot`) and sends a small job over a socket; this process streams
``torch.save`` from that memory into the store (:meth:`CheckpointStore.write` with a callable: hashed and
uploaded in bounded pieces), retries an unreachable store until the job's deadline, and on rank 0
collects the other ranks' file entries and commits (manifest last, ``latest`` by compare-and-swap).

Messages (pickled over a socketpair, :mod:`multiprocessing.connection`):
  trainer -> uploader: ``("config", dict)`` once, ``("job", Job)``, ``("newer",)`` (a newer state waits:
  give the current job up instead of retrying it), ``("abandon",)`` (the final state waits: give the
  current job up at the next piece), ``("stop",)``.
  uploader -> trainer: ``("ready",)``, ``("alive",)`` (at most once a second while working), ``("failing",
  step, error)`` after a failed try, ``("superseded", error)`` (a later attempt holds the run: the
  trainer stops), ``("done", step, committed, error, seconds)``.
It ignores the preemption signals (the trainer decides), exits when its parent dies (checked each
second), draws nothing from the trainer's RNG (a separate process), and never imports the trainer.

    python -m launch.uploader FD     (started by launch.checkpoint.Checkpointer)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, cast

import torch

from launch import forking
from launch.preempt import IGNORED_SIGNALS, die_with_parent, held, ignore_preemption_signals, release
from launch.snapshot import BufferRef, TensorMeta, map_buffer, rebuild
from launch.store import CheckpointExists, CheckpointStore, FileEntry, Superseded
from launch.store.backends import failure_cause
from schemas.contract import DEBUG_ENV

log = logging.getLogger("launch.uploader")

MAX_BACKOFF_S = 2.0  # between tries of one step of a save; each try is itself bounded (launch.store.s3)


@dataclass
class Job:
    step: int
    files: dict[str, Any]  # file name -> its state's skeleton (launch.snapshot.plan)
    metas: list[TensorMeta]  # where the skeletons' tensors lie in the buffer
    buffer: BufferRef
    meta: dict[str, Any]
    deadline: float = 0.0  # time.monotonic() (system-wide on Linux) after which retries stop


class Abandoned(Exception):
    """The trainer asked to give up this job (a newer state is waiting, or it is stopping)."""


class Uploader:
    def __init__(self, conn: Connection, store: CheckpointStore, rank: int, world_size: int) -> None:
        self.conn, self.store, self.rank, self.world_size = conn, store, rank, world_size
        self._maps: dict[int, tuple[int, Any]] = {}  # fd -> (generation, mmap)
        self.next_msg: tuple | None = None
        self.newer = False  # a newer state waits in the trainer: give up this job rather than retry it
        self.abandoning = False  # told to give up now (torch.save turns our exception into a RuntimeError)
        self._alive_sent = 0.0

    def serve(self) -> None:
        self.conn.send(("ready",))
        while True:
            msg = self.next_msg or self.conn.recv()
            self.next_msg = None
            if msg[0] == "stop":
                return
            if msg[0] == "job":
                self.run(msg[1])

    # -- one job -------------------------------------------------------------------------------------
    def run(self, job: Job) -> None:
        t0 = time.monotonic()
        self.newer = self.abandoning = False
        try:
            raw = self._mapped(job.buffer)
            entries = [
                self._retry(job, f"upload {name} of step {job.step}", lambda n=name: self._write(job, raw, n))
                for name in job.files
            ]
            if self.rank != 0:
                body = json.dumps([e.to_dict() for e in entries]).encode()
                self._retry(
                    job,
                    f"upload entries of step {job.step}",
                    lambda: self.store.write(job.step, f"rank{self.rank}.entries", body),
                )
            else:
                for r in range(1, self.world_size):
                    got = self._retry(
                        job, f"collect rank {r}'s files of step {job.step}", lambda r=r: self._entries(job, r)
                    )
                    entries += [FileEntry.from_dict(d) for d in json.loads(got)]
                meta = {**job.meta, "world_size": self.world_size}
                self._retry(
                    job, f"commit step {job.step}", lambda: self.store.commit(job.step, entries, meta)
                )
            self.conn.send(("done", job.step, self.rank == 0, None, time.monotonic() - t0))
        except Abandoned:
            self.conn.send(("done", job.step, False, "abandoned for a newer state", time.monotonic() - t0))
        except Superseded as exc:  # the trainer logs it and stops
            self.conn.send(("superseded", str(exc)))
            self.conn.send(("done", job.step, False, str(exc), time.monotonic() - t0))
        except Exception as exc:
            log.debug("step %d failed", job.step, exc_info=exc)
            self.conn.send(("done", job.step, False, failure_cause(exc), time.monotonic() - t0))

    def _write(self, job: Job, raw: Any, name: str) -> FileEntry:
        state = rebuild(job.files[name], raw, job.metas)
        return self.store.write(
            job.step, name, lambda f: torch.save(state, cast(IO[bytes], _Checked(f, self._check)))
        )

    def _entries(self, job: Job, rank: int) -> bytes:
        """Rank ``rank``'s file entries, waited for in short slices (a newer state may make them moot)."""
        end = min(job.deadline, time.monotonic() + 60.0)
        while True:
            wait = max(0.0, min(1.0, end - time.monotonic()))
            body = self.store.read_uncommitted(job.step, f"rank{rank}.entries", wait_s=wait)
            if body is not None:
                return body
            self._check()
            if self.newer:
                raise Abandoned
            if time.monotonic() >= end:
                raise TimeoutError(f"rank {rank} has not uploaded its files of step {job.step} yet")

    def _mapped(self, ref: BufferRef) -> Any:
        gen, mm = self._maps.get(ref.fd, (None, None))
        if gen != ref.generation:
            if mm is not None:
                mm.close()
            mm = map_buffer(ref)
            self._maps[ref.fd] = (ref.generation, mm)
        return mm

    def _check(self) -> None:
        """Between pieces and retries: a message from the trainer means this job should end; and at
        most once a second, a sign of life (the trainer kills an uploader that stays silent)."""
        if time.monotonic() - self._alive_sent > 1.0:
            self.conn.send(("alive",))
            self._alive_sent = time.monotonic()
        if self.next_msg is None and self.conn.poll():
            self.next_msg = self.conn.recv()
            if self.next_msg[0] == "newer":
                self.next_msg, self.newer = None, True
            elif self.next_msg[0] == "abandon":
                self.next_msg, self.abandoning = None, True
        if self.next_msg is not None:
            self.abandoning = True
        if self.abandoning:
            raise Abandoned

    def _retry(self, job: Job, what: str, fn: Any) -> Any:
        """Retry with back-off until the job's deadline: an outage delays the checkpoint, not training.

        The back-off stays short (at most ``MAX_BACKOFF_S``): each store call already gives up on a
        stalled connection within seconds, so the first try after the store answers again succeeds. A
        cause is logged once (as a warning) while it repeats; the raw exception goes to the debug log."""
        delay, last_cause = 0.5, None
        while True:
            self._check()
            try:
                return fn()
            except (Abandoned, CheckpointExists, Superseded):  # the store's answer, not its outage
                raise
            except Exception as exc:
                if self.abandoning:
                    raise Abandoned from exc
                cause = failure_cause(exc)
                error = f"{what} failed: {cause}"
                log.debug("%s", what, exc_info=exc)
                self.conn.send(("failing", job.step, error))
                if self.newer:
                    log.warning("%s; a newer state is waiting: giving this one up", error)
                    raise Abandoned from exc
                left = job.deadline - time.monotonic()
                if left < delay:
                    log.error("%s; giving up: the save's retry window ended", error)
                    raise
                if cause != last_cause:
                    log.warning(
                        "%s; retrying every %g s or less for up to %.0f s", error, MAX_BACKOFF_S, left
                    )
                last_cause = cause
                end = time.monotonic() + delay
                while time.monotonic() < end:  # stay responsive to "abandon" while backing off
                    self._check()
                    if self.newer:
                        raise Abandoned from exc
                    time.sleep(min(0.1, max(0.0, end - time.monotonic())))
                delay = min(delay * 2, MAX_BACKOFF_S)


class _Checked:
    """The file object torch.save writes into: checks for an abandon between pieces."""

    def __init__(self, f: IO[bytes], check: Any) -> None:
        self.f, self.check = f, check

    def write(self, data: Any) -> int:
        self.check()
        return self.f.write(data)

    def flush(self) -> None:
        pass


def _exit_with_parent(parent: int) -> None:
    """The trainer died (SIGKILL, OOM): a job of a dead attempt must not go on writing. Linux kills us
    with it (PR_SET_PDEATHSIG, set in main); this check each second covers the moment before that."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


Process = subprocess.Popen | forking.ForkedProcess
Started = tuple[Process, Connection]
REPO = Path(__file__).resolve().parents[1]


def start(fork: bool = False) -> Started:
    """A new uploader and this process's end of its socket: ``python -m launch.uploader FD``, or with
    ``fork`` (the trainer's first, before it has run a torch op or started a thread) forked from this
    process where :func:`launch.forking.enabled`."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    proc: Process
    cmd = [sys.executable, "-m", "launch.uploader", str(fd)]
    if fork and forking.enabled() and threading.active_count() == 1:
        proc = forking.fork_call(lambda: main([str(fd)]), cmd, argv=[__file__, str(fd)], keep_fds=[fd])
    else:
        with held(IGNORED_SIGNALS):  # a preemption signal during its imports must not kill it
            proc = subprocess.Popen(cmd, pass_fds=[fd], env=fresh_env(), stdin=subprocess.DEVNULL)
    theirs.close()
    return proc, Connection(ours.detach())


def fresh_env() -> dict[str, str]:
    """The environment of an uploader started as a fresh interpreter: ours, the repository first on
    ``PYTHONPATH`` (no empty entry, which would put the working directory on ``sys.path``)."""
    ours = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *ours]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ignore_preemption_signals()  # the trainer handles preemption; we stop when it says so
    release(IGNORED_SIGNALS)  # held since we started (launch.preempt.held): now they are ignored
    parent = os.getppid()
    die_with_parent(parent)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(1)
    conn = Connection(int(argv[0]))
    try:
        kind, cfg = conn.recv()
    except (EOFError, OSError):  # the trainer stopped before it needed an uploader
        return 0
    assert kind == "config", kind
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank{cfg['rank']} uploader] %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,  # forked from the trainer: its handlers are not ours
    )
    if os.environ.get(DEBUG_ENV):  # the raw exceptions behind each reported cause (ours only:
        logging.getLogger("launch").setLevel(logging.DEBUG)  # botocore's debug log shows the key id)
    store = CheckpointStore(**cfg["store"])
    with contextlib.suppress(EOFError, OSError):  # EOF: the trainer closed its end
        Uploader(conn, store, cfg["rank"], cfg["world_size"]).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
