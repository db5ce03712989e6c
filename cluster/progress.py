"""What the trainer wrote beside its checkpoints, read through the same store code it writes with.

``status.json`` (:class:`schemas.contract.TrainerStatus`), the newest metrics record (the last line of the
newest ``metrics/<attempt>.<chunk>.jsonl`` of each attempt) and the ``latest`` pointer, whose move time is
the commit time of the checkpoint it names. Every object is optional: a run that has not started has
none. No torch here: :mod:`launch.store` is torch-free.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launch.store import CheckpointStore
from schemas.contract import METRICS_DIR, STATUS_FILE, RunPaths, attempt_owner_of

if TYPE_CHECKING:
    from schemas.records import NodeHeartbeat

READ_TIMEOUT_S = 10.0
"""Per-call deadline of the CLI's store reads: a stalled S3 server costs ``pixpro status`` seconds, not
forever."""


@dataclass
class Progress:
    trainer: dict[str, Any] | None = None  # status.json as written
    metrics: dict[str, Any] | None = None  # newest metrics record
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    error: str | None = None  # the store could not be read

    def newest_first(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """status.json is written at attempt start and end, metrics every few steps: newest wins."""
        t, m = self.trainer, self.metrics
        if t and m and (m.get("time") or 0) > (t.get("updated") or 0):
            return m, t
        return t, m

    @property
    def record_time(self) -> float | None:
        """When the trainer last wrote a record (status.json or metrics) to its store."""
        times = [r.get(k) for r, k in ((self.trainer, "updated"), (self.metrics, "time")) if r]
        known = [t for t in times if isinstance(t, int | float)]
        return max(known) if known else None

    @property
    def step(self) -> int | None:
        return _first(*self.newest_first(), key="step")

    @property
    def total_steps(self) -> int | None:
        return _first(*self.newest_first(), key="total_steps")

    @property
    def epoch(self) -> int | None:
        return _first(*self.newest_first(), key="epoch")

    def metric(self, key: str) -> Any:
        return (self.metrics or {}).get(key)

    def now(self, key: str) -> Any:
        """``key`` as of :attr:`step`: from the newest record that has it (status.json, written when an
        attempt ends, holds LR and EMA momentum at its step; the last metrics record may be older)."""
        return _first(*self.newest_first(), key=key)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(*records: dict[str, Any] | None, key: str) -> Any:
    for rec in records:
        if rec and rec.get(key) is not None:
            return rec[key]
    return None


def _json(data: bytes | None) -> Any:
    try:
        return json.loads(data) if data is not None else None
    except ValueError:
        return None


def open_run_store(url: str, storage_options: dict[str, Any] | None = None) -> CheckpointStore:
    """The run's checkpoint store as the CLI opens it: the trainer's endpoint rule, a short deadline."""
    return CheckpointStore(url, storage_options, timeout_s=READ_TIMEOUT_S)


def newest_metrics(store: CheckpointStore, owner: str | None = None) -> dict[str, Any] | None:
    """The most recent record: the last line of the newest chunk of each attempt, newest by time. The
    attempt that holds the run (``owner``, of the newest claim) wins where it has written one: a stale
    attempt that trains on elsewhere until its next checkpoint stops it is not the run's progress."""
    newest: dict[str, str] = {}  # attempt -> its newest chunk ("<attempt>.<chunk>.jsonl" sorts by chunk)
    for rel in store.list_aux(METRICS_DIR):
        attempt = rel.removeprefix(f"{METRICS_DIR}/").rsplit(".", 2)[0]
        newest[attempt] = max(newest.get(attempt, ""), rel)
    held = [rel for attempt, rel in newest.items() if owner and attempt_owner_of(attempt) == owner]
    best: dict[str, Any] | None = None
    for rel in held or newest.values():
        lines = (store.read_aux(rel) or b"").decode(errors="replace").splitlines()
        rec = _json(lines[-1].encode()) if lines else None
        if isinstance(rec, dict) and (best is None or (rec.get("time") or 0) >= (best.get("time") or 0)):
            best = rec
    return best


def read_progress(store: CheckpointStore) -> Progress:
    try:
        trainer = _json(store.read_aux(STATUS_FILE))
        pointer = store.latest() or {}
        return Progress(
            trainer=trainer if isinstance(trainer, dict) else None,
            metrics=newest_metrics(store, pointer.get("owner")),
            checkpoint_step=pointer.get("step"),
            checkpoint_time=pointer.get("updated"),
        )
    except Exception as exc:
        return Progress(error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}")


def read_heartbeats(run_dir: str | Path) -> list[NodeHeartbeat]:
    """The run folder's ``heartbeats/<node>.json`` files (the nodes' agents write them; unreadable or
    half-written ones are skipped)."""
    paths = sorted(RunPaths(run_dir).heartbeats.glob("*.json"))
    if not paths:
        return []  # no model to build (pixpro status need not import pydantic)
    from schemas.records import NodeHeartbeat

    out = []
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            out.append(NodeHeartbeat.model_validate_json(path.read_bytes()))
    return out
