"""What the trainer wrote beside its checkpoints, read without importing ``launch`` (or torch).

``status.json`` (state, step, epoch, attempt, committed step), the newest metrics record
(``metrics/<attempt>.<chunk>.jsonl``; later attempts win), and the ``latest`` pointer with the age
of the checkpoint it names. Every file is optional: a run that has not started has none of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from cluster.storage import Store

STATUS_FILE = "status.json"
LATEST_FILE = "latest"
METRICS_DIR = "metrics"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step-0*(\d+)(?:\..*)?$")


@dataclass
class Progress:
    trainer: dict[str, Any] | None = None  # status.json as written
    metrics: dict[str, Any] | None = None  # newest metrics record
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    error: str | None = None  # the store could not be read

    def _newest_first(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """status.json is written at attempt start and end, metrics every few steps: newest wins."""
        t, m = self.trainer, self.metrics
        if t and m and (m.get("time") or 0) > (t.get("updated") or 0):
            return m, t
        return t, m

    @property
    def step(self) -> int | None:
        return _first(*self._newest_first(), key="step")

    @property
    def total_steps(self) -> int | None:
        return _first(*self._newest_first(), key="total_steps")

    @property
    def epoch(self) -> int | None:
        return _first(*self._newest_first(), key="epoch")

    def metric(self, key: str) -> Any:
        return (self.metrics or {}).get(key)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(*records: dict[str, Any] | None, key: str) -> Any:
    for rec in records:
        if rec and rec.get(key) is not None:
            return rec[key]
    return None


def _json(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _last_chunks(store: Store) -> list[str]:
    """The newest chunk of every attempt: ``metrics/<attempt>.<chunk>.jsonl`` or
    ``metrics/<attempt>/<chunk>.jsonl`` (both layouts are read)."""
    newest: dict[str, str] = {}
    for entry in store.listdir(METRICS_DIR):
        if entry.endswith(".jsonl"):
            attempt = entry[: -len(".jsonl")].rsplit(".", 1)[0]
            newest[attempt] = max(newest.get(attempt, ""), f"{METRICS_DIR}/{entry}")
        else:
            chunks = [c for c in store.listdir(f"{METRICS_DIR}/{entry}") if c.endswith(".jsonl")]
            if chunks:
                newest[entry] = f"{METRICS_DIR}/{entry}/{chunks[-1]}"
    return list(newest.values())


def newest_metrics(store: Store) -> dict[str, Any] | None:
    """The most recent record: the last line of the newest chunk of each attempt, newest by time."""
    best: dict[str, Any] | None = None
    for chunk in _last_chunks(store):
        data = store.cat(chunk) or b""
        for line in reversed(data.decode(errors="replace").splitlines()):
            rec = _json(line.encode()) if line.strip() else None
            if isinstance(rec, dict):
                if best is None or (rec.get("time") or 0) >= (best.get("time") or 0):
                    best = rec
                break
    return best


def latest_checkpoint(store: Store) -> tuple[int | None, float | None]:
    """(step, commit time) of the checkpoint ``latest`` points at."""
    pointer = _json(store.cat(LATEST_FILE))
    if isinstance(pointer, dict):
        step = pointer.get("step")
    elif isinstance(pointer, int):
        step = pointer
    else:
        return None, None
    if not isinstance(step, int):
        return None, None
    folder = next(
        (
            pointer[k]
            for k in ("dir", "prefix", "path", "name")
            if isinstance(pointer, dict) and isinstance(pointer.get(k), str)
        ),
        None,
    )
    if folder is None or "/" in folder.strip("/"):
        folder = next(
            (d for d in store.listdir() if (m := _STEP_DIR.match(d)) and int(m.group(1)) == step), None
        )
    when = None
    if folder is not None:
        manifest = _json(store.cat(f"{folder}/{MANIFEST_FILE}"))
        if isinstance(manifest, dict):
            meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
            when = meta.get("time") or manifest.get("time") or manifest.get("created")
        if not isinstance(when, (int, float)):
            when = store.mtime(f"{folder}/{MANIFEST_FILE}")
    if isinstance(pointer, dict) and not isinstance(when, (int, float)):
        when = pointer.get("time") if isinstance(pointer.get("time"), (int, float)) else None
    if when is None:
        when = store.mtime(LATEST_FILE)
    return step, when


def read_progress(store: Store) -> Progress:
    try:
        trainer = _json(store.cat(STATUS_FILE))
        step, when = latest_checkpoint(store)
        return Progress(
            trainer=trainer if isinstance(trainer, dict) else None,
            metrics=newest_metrics(store),
            checkpoint_step=step,
            checkpoint_time=when,
        )
    except Exception as exc:
        return Progress(error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
