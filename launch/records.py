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
from launch.store.backends import failure_cause
from schemas.contract import METRICS_DIR, STATUS_FILE, MetricsRecord, TrainerStatus

log = logging.getLogger(__name__)

CHUNK_LINES = 500
FINAL_FLUSH_S = 5.0
"""How long the last flush of a run may wait for a stalled store: the run's end is not held hostage; the
records it could not write are lost (the checkpoints are not)."""


def write_status(store: CheckpointStore, **fields: Any) -> None:
    """Overwrite ``status.json`` (one small PUT); failures are logged, never fatal."""
    record = TrainerStatus(updated=round(time.time(), 3), **fields)
    try:
        store.put_aux(STATUS_FILE, record.model_dump_json().encode())
    except Exception as exc:
        log.debug("writing %s failed", STATUS_FILE, exc_info=exc)
        log.warning("could not write %s: %s", STATUS_FILE, failure_cause(exc))


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
        self.error: str | None = None  # why the last flush failed; cleared by a flush that succeeds

    def append(self, record: dict[str, Any]) -> None:
        if self.error and not record.get("store_error"):  # what status shows once the store answers
            record = {**record, "store_error": f"metrics flush failed: {self.error}"}
        line = MetricsRecord(time=round(time.time(), 3), attempt=self.attempt, **record)
        with self._lock:
            if len(self._chunks[-1]) >= CHUNK_LINES:
                self._chunks.append([])
            self._chunks[-1].append(json.dumps(line.model_dump(exclude_none=True), sort_keys=True))
            self._pending.add(len(self._chunks) - 1)

    def flush(self, wait: bool = False, timeout_s: float = FINAL_FLUSH_S) -> bool:
        """Write the chunks that changed, in the background unless ``wait``; a busy flusher is skipped.

        ``wait`` waits at most ``timeout_s`` in all (a flush stuck on a stalled store is left behind on
        its daemon thread) and returns whether everything was written."""
        end = time.monotonic() + timeout_s
        if self._thread is not None and self._thread.is_alive():
            if not wait:
                return False
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return self._late(timeout_s)
        self._thread = threading.Thread(target=self._write, name="metrics-flush", daemon=True)
        self._thread.start()
        if not wait:
            return False
        self._thread.join(max(0.0, end - time.monotonic()))
        if self._thread.is_alive():
            return self._late(timeout_s)
        with self._lock:
            return not self._pending

    def _late(self, timeout_s: float) -> bool:
        log.warning(
            "metrics not written within %g s (%s); not waiting longer: the newest records may be missing",
            timeout_s,
            self.error or "the store is not answering",
        )
        return False

    def _write(self) -> None:
        with self._lock:
            todo = {i: "\n".join(self._chunks[i]) + "\n" for i in sorted(self._pending)}
            self._pending.clear()
        for i, text in todo.items():
            try:
                self.store.put_aux(f"{self.prefix}.{i:06d}.jsonl", text.encode())
            except Exception as exc:
                cause = failure_cause(exc)
                log.debug("metrics flush failed", exc_info=exc)
                if cause != self.error:
                    log.warning("metrics flush failed: %s; retried at the next flush", cause)
                self.error = cause
                with self._lock:
                    self._pending.update(j for j in todo if j >= i)
                return  # the next chunk would wait on the same store
        self.error = None


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


def knn_results(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kNN monitor's evaluations among ``records`` (one per step, as :func:`read_metrics` gives them):
    the records measured at their own step; the others only carry the newest result on."""
    return [r for r in records if r.get("knn_step") is not None and r["knn_step"] == r["step"]]


def last_knn(records: list[dict[str, Any]], up_to: int) -> dict[str, Any]:
    """The kNN monitor's newest result measured at or before step ``up_to`` (a resumed attempt carries it
    on; results after its checkpoint are measured again), as the record fields; {} when there is none."""
    done = [r for r in knn_results(records) if r["step"] <= up_to]
    if not done:
        return {}
    newest = max(done, key=lambda r: r["step"])
    return {k: newest[k] for k in ("knn_top1", "knn_top5", "knn_step")}
