"""Save and restore the whole training state through a :class:`launch.store.CheckpointStore`.

Rank 0 writes ``train.pt`` (models, optimizer, scaler, progress, sampler, plan); every rank writes
``rank<r>.pt`` (its RNG). Loads use ``weights_only=True``: a checkpoint can never execute code.

Saving costs the training loop one copy of the tensors. Why this design (chosen over
torch.distributed.checkpoint's async save with a process-based checkpointer): DCP writes its own layout
and metadata, not our ``step-<N>.<attempt>/`` prefix with a manifest whose sha256 per file the commit
protocol and every reader (``pixpro status``, export, eval) rely on, and its process checkpointer gives
no hook for superseding a queued save or for a deadline per save. So:

* one long-lived uploader process per rank (:mod:`launch.uploader`), started with the trainer (before
  the DataLoader forks its workers), which imports torch once and does the serializing, hashing,
  upload and (rank 0) commit; the training thread never competes with it for the GIL;
* the trainer copies the state into a shared-memory buffer it reuses (:mod:`launch.snapshot`) and
  sends a small job; the uploader streams ``torch.save`` from that memory into the store in bounded
  pieces, so host memory holds the state once plus a part buffer;
* at most one job in flight and one waiting: a save due while the upload of the previous one is still
  running (an S3 outage) replaces the waiting one, so training never waits and memory stays bounded
  (a second buffer exists only while two states overlap); the job in flight, told that a newer state
  waits, gives up at its next failure instead of retrying, so an outage ends with the newest state;
* liveness: a watcher thread reads the uploader's reports; an uploader that dies is reported in one
  line and replaced for the next save, one still busy past its job's deadline or silent for
  ``silent_s`` (it reports progress every second) is killed; ``flush``
  waits with a deadline and says in one line what did not commit;
* a blocking save (the last one, at a preemption) abandons the upload in flight (an older state) and
  gives the final state the whole budget.
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from launch import uploader
from launch.collectives import Collectives
from launch.snapshot import SharedBuffer, copy_in, plan
from launch.store import CheckpointStore, CorruptCheckpoint, Manifest
from launch.uploader import Job
from schemas.contract import TRAIN_FILE, rank_file

log = logging.getLogger(__name__)

__all__ = ["TRAIN_FILE", "Checkpointer", "from_bytes", "rank_file", "to_bytes"]


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@dataclass
class _Pending:
    job: Job
    slot: int  # which shared buffer holds its state
    copy_s: float  # the training thread's part of the save
    budget_s: float | None
    deadline: float = 0.0  # monotonic; fixed at save time for budgeted saves, else at hand-over
    sent: float = 0.0


RETRY_FOR_S = 600.0  # how long a save without a budget is retried before it is given up
HANG_GRACE_S = 10.0  # past a save's deadline, how long a busy uploader gets before it counts as hung
FINAL_FLUSH_S = RETRY_FOR_S + HANG_GRACE_S
"""The longest a blocking save without a budget waits by default (:attr:`Checkpointer.final_flush_s`)."""


class Checkpointer:
    def __init__(
        self,
        store: CheckpointStore,
        rank: int,
        world_size: int,
        retry_for_s: float = RETRY_FOR_S,
        hang_grace_s: float = HANG_GRACE_S,
        silent_s: float = 180.0,
        spare: uploader.Started | None = None,
    ) -> None:
        """``spare``: an uploader started early (:func:`launch.uploader.start`, by fork before this
        process had threads), taken as the first one."""
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.retry_for_s = retry_for_s
        self.hang_grace_s = hang_grace_s
        self.silent_s = silent_s  # longer than one S3 call may take (its deadline: 20 s + 1 s per MiB)
        self._heard = time.monotonic()
        self.last_committed: int | None = None
        self.last_commit_s: float | None = None  # hand-over to 'latest' moved, of the last commit
        self.last_commit_time: float | None = None  # wall clock of the last commit
        self.store_error: str | None = None  # the last failed try, cleared by the next success
        self.superseded: str | None = None  # why a later attempt holds the run (launch.store.Superseded)
        self.restarts = 0
        self._cond = threading.Condition()
        self._buffers: list[SharedBuffer | None] = [None, None]
        self._inflight: _Pending | None = None
        self._waiting: _Pending | None = None
        self._results: dict[int, bool] = {}
        self._proc: uploader.Process | None = None
        self._spare = spare
        self._conn: Connection | None = None
        self._ready = False
        self._closing = False
        self._prefetched: tuple[Manifest, dict[str, bytes]] | None = None
        self._prefetcher: threading.Thread | None = None
        self._start()
        self._watcher = threading.Thread(target=self._watch, name="ckpt-uploader-watch", daemon=True)
        self._watcher.start()

    # --- the uploader process ---------------------------------------------------------------------
    def _start(self) -> None:
        spare, self._spare = self._spare, None
        self._proc, self._conn = spare or uploader.start()  # a restart: a fresh interpreter (threads run)
        self._ready, self._started = False, time.monotonic()
        cfg = {"store": self.store.config(), "rank": self.rank, "world_size": self.world_size}
        self._conn.send(("config", cfg))

    def _watch(self) -> None:
        """Reads the uploader's reports; notices it dying or hanging; hands over the waiting job."""
        while True:
            with self._cond:
                if self._closing:
                    return
                conn, proc = self._conn, self._proc
            msg: tuple | None = None
            try:
                if conn is not None and conn.poll(0.2):
                    msg = conn.recv()
            except (EOFError, OSError, ValueError):
                msg = None
                time.sleep(0.05)  # let the process finish dying, so the exit status is known below
            with self._cond:
                if self._closing or conn is not self._conn:
                    continue
                now = time.monotonic()
                if msg is not None:
                    self._heard = now
                    self._on_message(msg)
                elif proc is not None and proc.poll() is not None:
                    self._on_death(f"exited with status {proc.returncode}")
                elif self._inflight is not None and now > self._inflight.deadline + self.hang_grace_s:
                    self._on_death(f"still busy {self.hang_grace_s:g} s past its deadline (hung); killed it")
                elif (
                    self._inflight is not None and now - max(self._heard, self._inflight.sent) > self.silent_s
                ):
                    self._on_death(f"silent for {self.silent_s:g} s (hung); killed it")
                self._dispatch()
                self._cond.notify_all()
            if conn is None:
                time.sleep(0.2)

    def _on_message(self, msg: tuple) -> None:
        if msg[0] == "ready":
            self._ready = True
            log.info("checkpoint uploader ready after %.1f s", time.monotonic() - self._started)
        elif msg[0] == "failing":
            self.store_error = msg[2]
        elif msg[0] == "superseded":
            self.superseded = msg[1]
        elif msg[0] == "done":
            _, step, committed, error, _secs = msg
            p, self._inflight = self._inflight, None
            ok = committed or (self.rank != 0 and error is None)
            self._results[step] = ok
            if ok:
                self.store_error = None
            if committed and p is not None:
                self.last_committed = step
                self.last_commit_s = round(p.copy_s + time.monotonic() - p.sent, 3)
                self.last_commit_time = time.time()
                log.info("checkpoint step %d committed in %.1f s", step, self.last_commit_s)
            elif error and "abandoned" in error:
                log.info("checkpoint step %d abandoned for a newer state", step)
            elif error:
                self.store_error = error
                log.error("checkpoint step %d not committed: %s", step, error)

    def _on_death(self, why: str) -> None:
        p, self._inflight = self._inflight, None
        if p is not None:
            self._results[p.job.step] = False
        lost = f" during step {p.job.step} (not committed)" if p is not None else ""
        log.warning("checkpoint uploader %s%s; a new one takes the next save", why, lost)
        self._kill()
        self.restarts += 1

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn, self._ready = None, None, False

    def _dispatch(self) -> None:
        """Hand the waiting job to an idle uploader (starting one if it died)."""
        if self._waiting is None or self._inflight is not None or self._closing:
            return
        if self._proc is None:
            self._start()
        if not self._ready or self._conn is None:
            return
        p, self._waiting = self._waiting, None
        now = time.monotonic()
        if p.budget_s is None:
            p.deadline = now + self.retry_for_s
        p.job.deadline, p.sent = p.deadline, now
        if not self._send(("job", p.job)):  # it died just now: the next one takes this job
            self._waiting = p
            self._on_death("went away")
            return
        self._inflight = p

    def _send(self, msg: tuple) -> bool:
        try:
            assert self._conn is not None
            self._conn.send(msg)
            return True
        except OSError:
            return False

    # --- saving -----------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        train_state: dict | None,
        rank_state: dict,
        meta: dict,
        blocking: bool,
        budget_s: float | None = None,
    ) -> bool:
        """Copy the state to shared memory (every rank, same step) and hand it to the uploader.

        Returns at once unless ``blocking``; then it waits for the commit, at most ``budget_s`` (a
        preemption must commit within the signal's lead time), and returns whether it committed (on
        ranks other than 0: whether this rank's files were written). A save that finds the previous
        one still uploading replaces the one waiting behind it, if any; a blocking save abandons the
        one in flight.
        """
        t0 = time.monotonic()
        files = {rank_file(self.rank): rank_state}
        if self.rank == 0:
            assert train_state is not None
            files[TRAIN_FILE] = train_state
        with self._cond:
            if self._inflight is not None and self._conn is not None:
                self._send(("abandon",) if blocking else ("newer",))  # a dead one: the watcher says so
            slot = 1 if self._inflight is not None and self._inflight.slot == 0 else 0
            skeleton, tensors, metas, nbytes = plan(files)
            buf = self._buffers[slot]
            if buf is None or buf.nbytes < nbytes:
                if buf is not None:
                    buf.close()
                buf = self._buffers[slot] = SharedBuffer(nbytes)
            copy_in(buf, tensors, metas)
            if self._waiting is not None:
                log.info(
                    "checkpoint step %d superseded by step %d before its upload began",
                    self._waiting.job.step,
                    step,
                )
                self._results[self._waiting.job.step] = False
            job = Job(step, skeleton, metas, buf.ref, meta)
            self._waiting = _Pending(job, slot, time.monotonic() - t0, budget_s)
            if budget_s is not None:
                self._waiting.deadline = t0 + budget_s
            for old in sorted(self._results)[:-8]:
                del self._results[old]
            self._dispatch()
        return (
            self.flush(None if budget_s is None else budget_s - (time.monotonic() - t0)) if blocking else True
        )

    def busy(self) -> bool:
        """A save is still being uploaded or waits for its turn."""
        with self._cond:
            return self._inflight is not None or self._waiting is not None

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the saves handed over so far, at most ``timeout_s`` (default: the retry window).

        Returns whether the newest one committed; if it has not when the time is up, says so in one line
        and stops the uploader (a new one takes the next save).
        """
        limit = time.monotonic() + (self.retry_for_s + self.hang_grace_s if timeout_s is None else timeout_s)
        with self._cond:
            newest = self._waiting or self._inflight
            if newest is None:
                return True
            step = newest.job.step
            while (self._waiting is not None or self._inflight is not None) and time.monotonic() < limit:
                self._cond.wait(0.2)
            if self._waiting is not None or self._inflight is not None:
                waited = timeout_s if timeout_s is not None else self.retry_for_s
                log.error(
                    "checkpoint step %d not committed within %.0f s (%s); giving up on it",
                    step,
                    waited,
                    self.store_error or "uploader still busy",
                )
                if self._inflight is not None:
                    self._results[self._inflight.job.step] = False
                self._waiting = self._inflight = None
                self._kill()  # a new uploader takes the next save
                self.restarts += 1
                return False
            return self._results.get(step, False)

    def health(self) -> dict[str, Any]:
        """For status.json and the metrics: the last commit and whether the store is failing now."""
        with self._cond:
            return {
                "committed_step": self.last_committed,
                "last_commit_s": self.last_commit_s,
                "last_commit_time": None
                if self.last_commit_time is None
                else round(self.last_commit_time, 3),
                "store_error": self.store_error,
            }

    def close(self) -> None:
        """Stop the uploader (after ``flush``) and free the buffers."""
        with self._cond:
            self._closing = True
            if self._conn is not None and self._proc is not None and self._send(("stop",)):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=10)
            self._kill()
            for i, buf in enumerate(self._buffers):
                if buf is not None:
                    buf.close()
                    self._buffers[i] = None
        self._watcher.join(timeout=5)

    # --- loading ----------------------------------------------------------------------------------
    def prefetch(self) -> None:
        """Start downloading the files ``latest`` names on a thread, so a resume's download overlaps
        building the data and the model; :meth:`load_latest` uses them if it picks that checkpoint."""

        def run() -> None:
            m = self.store.latest_manifest()
            if m is None:
                return
            names = [TRAIN_FILE]
            if m.meta.get("world_size") == self.world_size:
                names.append(rank_file(self.rank))
            try:
                self._prefetched = (m, {n: self.store.read(m, n) for n in names})
            except Exception as exc:  # load_latest reads again and reports what is wrong
                log.debug("prefetch of step %d failed: %s", m.step, exc)

        self._prefetcher = threading.Thread(target=run, name="ckpt-prefetch", daemon=True)
        self._prefetcher.start()

    def _read(self, manifest: Manifest, name: str) -> bytes:
        got = self._prefetched
        if got is not None and got[0] == manifest and name in got[1]:
            return got[1].pop(name)
        return self.store.read(manifest, name)

    @property
    def final_flush_s(self) -> float:
        """The longest a blocking save without a budget may wait (the retry window, then the hang grace)."""
        return self.retry_for_s + self.hang_grace_s

    def load_latest(self, collectives: Collectives | None = None) -> tuple[int, dict, dict | None] | None:
        """(step, train_state, rank_state or None) of the newest valid checkpoint, all ranks the same.

        Rank 0 walks the valid candidates newest first and broadcasts its manifest; a checkpoint whose
        file fails its checksum on any rank is skipped for the next older one. ``rank_state`` is None
        when the world size changed (the per-rank RNG is then re-derived by the caller). ``collectives``:
        the job's (None: a process alone).
        """
        col = collectives or Collectives()
        if self._prefetcher is not None:
            self._prefetcher.join()
        candidates = self.store.candidates() if self.rank == 0 else None
        while True:
            manifest = next(candidates, None) if candidates is not None else None
            body = col.broadcast_bytes(manifest.to_json() if manifest else b"")
            if not body:
                return None
            manifest = Manifest.from_json(body)
            try:
                train_state = from_bytes(self._read(manifest, TRAIN_FILE))
                rank_state = None
                if manifest.meta.get("world_size") == self.world_size:
                    rank_state = from_bytes(self._read(manifest, rank_file(self.rank)))
                ok = True
            except CorruptCheckpoint as exc:
                log.warning("skipping checkpoint: %s", exc)
                ok = False
            if col.all(ok):
                self._prefetched = None
                return manifest.step, train_state, rank_state
