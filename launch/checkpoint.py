"""Save and restore the whole training state through a :class:`launch.store.CheckpointStore`.

Rank 0 writes ``train.pt`` (models, optimizer, scaler, progress, sampler, plan); every rank writes
``rank<r>.pt`` (its RNG). Serialising is the snapshot and happens on the training thread; the upload
and the commit run on a background thread so training does not wait on S3. One upload is in flight at
a time; a preemption waits for it (``flush``) before exiting. Loads use ``weights_only=True``: a
checkpoint can never execute code.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from launch.store import CheckpointStore, CorruptCheckpoint, FileEntry, Manifest

log = logging.getLogger(__name__)

TRAIN_FILE = "train.pt"


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    def __init__(self, store: CheckpointStore, rank: int, world_size: int, upload_retries: int = 20) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.upload_retries = upload_retries
        self._thread: threading.Thread | None = None
        self.last_committed: int | None = None

    # --- saving -----------------------------------------------------------------------------------
    def save(self, step: int, train_state: dict | None, rank_state: dict, meta: dict, blocking: bool) -> None:
        """Snapshot now (collective: every rank calls it at the same step), upload in the background."""
        files = {rank_file(self.rank): to_bytes(rank_state)}
        if self.rank == 0:
            assert train_state is not None
            files[TRAIN_FILE] = to_bytes(train_state)
        local = [FileEntry(name, len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()]
        entries = [e for per_rank in _gather(local, self.world_size) for e in per_rank]
        self.flush()
        meta = {**meta, "world_size": self.world_size}
        self._thread = threading.Thread(
            target=self._upload, args=(step, files, entries, meta), name=f"ckpt-upload-{step}", daemon=True
        )
        self._thread.start()
        if blocking:
            self.flush()

    def _upload(self, step: int, files: dict[str, bytes], entries: list[FileEntry], meta: dict) -> None:
        try:
            for name, data in files.items():
                self._retry(f"upload {name} of step {step}", lambda n=name, d=data: self.store.write(step, n, d))
            if self.rank == 0:
                self._retry(f"commit step {step}", lambda: self.store.commit(step, entries, meta))
                self.last_committed = step
                log.info("checkpoint step %d committed", step)
        except Exception as exc:  # noqa: BLE001 - a failed checkpoint must not kill training
            log.error("checkpoint step %d not committed: %s", step, exc)

    def _retry(self, what: str, fn) -> Any:
        delay = 0.5
        for attempt in range(1, self.upload_retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - storage errors come in many types
                if attempt == self.upload_retries:
                    raise
                log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__, exc, attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        return None

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
