"""Run metrics as JSON lines next to the checkpoints, readable by ``pixpro status`` from any login node.

Object stores cannot append, so each attempt writes its own chunk files
(``metrics/<attempt>.<chunk>.jsonl``); only the current chunk is rewritten, which keeps a flush small
however long the run. A resumed attempt repeats the steps after its checkpoint; readers keep, for each
step, the record of the latest attempt.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from launch.store import CheckpointStore

log = logging.getLogger(__name__)

CHUNK_LINES = 500


class MetricsLog:
    def __init__(self, store: CheckpointStore, attempt: str) -> None:
        self.store = store
        self.prefix = f"metrics/{attempt}"
        self.attempt = attempt
        self._chunk = 0
        self._lines: list[str] = []
        self._dirty = False

    def append(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), "attempt": self.attempt, **record}
        self._lines.append(json.dumps(record, sort_keys=True))
        self._dirty = True
        if len(self._lines) >= CHUNK_LINES:
            self.flush()
            self._chunk += 1
            self._lines = []

    def flush(self) -> None:
        """Rewrite the current chunk; a failed flush is logged, never fatal (metrics are not state)."""
        if not self._dirty:
            return
        try:
            self.store.put_aux(f"{self.prefix}.{self._chunk:06d}.jsonl", ("\n".join(self._lines) + "\n").encode())
            self._dirty = False
        except Exception as exc:  # noqa: BLE001 - storage outages must not stop training
            log.warning("metrics flush failed (will retry at the next flush): %s", type(exc).__name__)


def read_metrics(store: CheckpointStore) -> list[dict[str, Any]]:
    """All records of all attempts, one per step, the latest attempt winning, sorted by step."""
    by_step: dict[int, dict[str, Any]] = {}
    for rel in sorted(store.list_aux("metrics")):
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
