"""Save and restore the whole training state through a :class:`launch.store.CheckpointStore`.

Rank 0 writes ``train.pt`` (models, optimizer, scaler, progress, sampler, plan); every rank writes
``rank<r>.pt`` (its RNG). The training thread only copies the tensors; serializing, hashing, the
upload and the commit run on a background thread so training does not wait on S3. One upload is in flight at
a time; a preemption waits for it (``flush``) before exiting. Loads use ``weights_only=True``: a
checkpoint can never execute code.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from launch.store import CheckpointStore, CorruptCheckpoint, FileEntry, Manifest
from schemas.contract import TRAIN_FILE, rank_file

log = logging.getLogger(__name__)

__all__ = ["TRAIN_FILE", "Checkpointer", "from_bytes", "rank_file", "to_bytes"]


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _snapshot(obj: Any) -> Any:
    """A deep copy of every tensor (on the CPU), so training can go on while the copy is serialized."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


class Checkpointer:
    def __init__(
        self, store: CheckpointStore, rank: int, world_size: int, retry_for_s: float = 600.0
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.retry_for_s = retry_for_s
        self._thread: threading.Thread | None = None
        self._deadline = float("inf")  # retries of the upload in flight stop here
        self.last_committed: int | None = None

    # --- saving -----------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        train_state: dict | None,
        rank_state: dict,
        meta: dict,
        blocking: bool,
        budget_s: float | None = None,
    ) -> None:
        """Snapshot now (every rank, same step); serialize, upload and commit in the background.

        The training thread only copies the tensors (the snapshot); ``torch.save``, hashing and the
        upload run on a background thread. Ranks other than 0 leave their file entries in a small
        ``rank<r>.entries`` file that rank 0 collects before committing, so no collective runs off the
        training thread. ``blocking`` waits for the commit; ``budget_s`` bounds the retries of this
        upload and of the one still in flight (a preemption must finish within the signal's lead time).
        """
        if budget_s is not None:
            self._deadline = min(self._deadline, time.monotonic() + budget_s)
        files = {rank_file(self.rank): _snapshot(rank_state)}
        if self.rank == 0:
            assert train_state is not None
            files[TRAIN_FILE] = _snapshot(train_state)
        self.flush()
        self._deadline = time.monotonic() + (budget_s if budget_s is not None else self.retry_for_s)
        meta = {**meta, "world_size": self.world_size}
        self._thread = threading.Thread(
            target=self._upload, args=(step, files, meta), name=f"ckpt-upload-{step}", daemon=True
        )
        self._thread.start()
        if blocking:
            self.flush()

    def _upload(self, step: int, files: dict[str, Any], meta: dict) -> None:
        try:
            entries = []
            for name, obj in files.items():
                data = to_bytes(obj)
                entries.append(
                    self._retry(
                        f"upload {name} of step {step}", lambda n=name, d=data: self.store.write(step, n, d)
                    )
                )
            if self.rank != 0:
                body = json.dumps([e.to_dict() for e in entries]).encode()
                self._retry(
                    f"upload entries of step {step}",
                    lambda: self.store.write(step, f"rank{self.rank}.entries", body),
                )
                return
            for r in range(1, self.world_size):
                body = self._retry(
                    f"collect rank {r}'s files of step {step}", lambda r=r: self._entries_of(step, r)
                )
                entries += [FileEntry.from_dict(d) for d in json.loads(body)]
            self._retry(f"commit step {step}", lambda: self.store.commit(step, entries, meta))
            self.last_committed = step
            log.info("checkpoint step %d committed", step)
        except Exception as exc:
            log.error("checkpoint step %d not committed: %s", step, exc)

    def _entries_of(self, step: int, rank: int) -> bytes:
        wait = max(0.0, min(60.0, self._deadline - time.monotonic()))
        body = self.store.read_uncommitted(step, f"rank{rank}.entries", wait_s=wait)
        if body is None:
            raise TimeoutError(f"rank {rank} has not uploaded its files of step {step} yet")
        return body

    def _retry(self, what: str, fn) -> Any:
        """Retry with backoff until the deadline: an S3 outage delays the checkpoint, not training."""
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:
                if time.monotonic() + delay > self._deadline:
                    raise
                log.warning(
                    "%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__, exc, attempt, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def flush(self) -> None:
        """Wait for the upload in flight (if any)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- loading ----------------------------------------------------------------------------------
    def load_latest(self) -> tuple[int, dict, dict | None] | None:
        """(step, train_state, rank_state or None) of the newest valid checkpoint, all ranks the same.

        Rank 0 walks the valid candidates newest first and broadcasts its manifest; a checkpoint whose
        file fails its checksum on any rank is skipped for the next older one. ``rank_state`` is None
        when the world size changed (the per-rank RNG is then re-derived by the caller).
        """
        candidates = self.store.candidates() if self.rank == 0 else None
        while True:
            manifest = next(candidates, None) if candidates is not None else None
            body = _broadcast_bytes(manifest.to_json() if manifest else b"", self.world_size)
            if not body:
                return None
            manifest = Manifest.from_json(body)
            try:
                train_state = from_bytes(self.store.read(manifest, TRAIN_FILE))
                rank_state = None
                if manifest.meta.get("world_size") == self.world_size:
                    rank_state = from_bytes(self.store.read(manifest, rank_file(self.rank)))
                ok = 1
            except CorruptCheckpoint as exc:
                log.warning("skipping checkpoint: %s", exc)
                ok = 0
            if _all_ok(ok, self.world_size):
                return manifest.step, train_state, rank_state


def _broadcast_bytes(data: bytes, world_size: int) -> bytes:
    if world_size == 1:
        return data
    box = [data]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ok(ok: int, world_size: int) -> bool:
    if world_size == 1:
        return bool(ok)
    t = torch.tensor([ok], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
