"""What the trainer writes beside its checkpoints for ``pixpro status`` and ``pixpro plot``: its status
record (``status.json``) and its metrics as JSON lines (formats in :mod:`schemas.contract`).

Object stores cannot append, so each attempt writes its own chunk files
(``metrics/<attempt>.<chunk>.jsonl``); only the current chunk is rewritten, which keeps a flush small
however long the run. A resumed attempt repeats the steps after its checkpoint; readers keep, for each
step, the record of the latest attempt.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from launch.store import CheckpointStore
from schemas.contract import METRICS_DIR, STATUS_FILE, MetricsRecord, TrainerStatus

log = logging.getLogger(__name__)

CHUNK_LINES = 500


def write_status(store: CheckpointStore, **fields: Any) -> None:
    """Overwrite ``status.json`` (one small PUT); failures are logged, never fatal."""
    record = TrainerStatus(updated=round(time.time(), 3), **fields)
    try:
        store.put_aux(STATUS_FILE, record.model_dump_json().encode())
    except Exception as exc:
        log.warning("could not write %s: %s", STATUS_FILE, type(exc).__name__)


class MetricsLog:
    """Rank 0's metrics writer. Flushes run on a background thread, at most one at a time: a slow or
    failing store delays the metrics file, never the training step."""

    def __init__(self, store: CheckpointStore, attempt: str) -> None:
        self.store = store
        self.prefix = f"{METRICS_DIR}/{attempt}"
        self.attempt = attempt
        self._chunks: list[list[str]] = [[]]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: set[int] = set()  # chunk numbers with lines not yet written

    def append(self, record: dict[str, Any]) -> None:
        line = MetricsRecord(time=round(time.time(), 3), attempt=self.attempt, **record)
        with self._lock:
            if len(self._chunks[-1]) >= CHUNK_LINES:
                self._chunks.append([])
            self._chunks[-1].append(json.dumps(line.model_dump(exclude_none=True), sort_keys=True))
            self._pending.add(len(self._chunks) - 1)

    def flush(self, wait: bool = False) -> None:
        """Write the chunks that changed, in the background unless ``wait``; a busy flusher is skipped."""
        if self._thread is not None and self._thread.is_alive():
            if not wait:
                return
            self._thread.join()
        self._thread = threading.Thread(target=self._write, name="metrics-flush", daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()

    def _write(self) -> None:
        with self._lock:
            todo = {i: "\n".join(self._chunks[i]) + "\n" for i in sorted(self._pending)}
            self._pending.clear()
        for i, text in todo.items():
            try:
                self.store.put_aux(f"{self.prefix}.{i:06d}.jsonl", text.encode())
            except Exception as exc:
                log.warning("metrics flush failed (retried at the next flush): %s", type(exc).__name__)
                with self._lock:
                    self._pending.add(i)


def read_metrics(store: CheckpointStore) -> list[dict[str, Any]]:
    """All records of all attempts, one per step, the latest attempt winning, sorted by step."""
    by_step: dict[int, dict[str, Any]] = {}
    for rel in sorted(store.list_aux(METRICS_DIR)):
        data = store.read_aux(rel)
        for line in (data or b"").decode().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = rec.get("step", -1)
            if step not in by_step or by_step[step].get("time", 0) <= rec.get("time", 0):
                by_step[step] = rec
    return [by_step[k] for k in sorted(by_step)]
