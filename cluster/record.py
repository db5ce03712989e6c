"""The run record: what a run is (id, spec hash, resources, where its checkpoints go) and its attempts.

Written as ``run.json`` in the run folder and beside the checkpoints, so a run can be found and
understood from either place (another login node, or the bucket alone). Credentials never appear
here: the spec refuses them and storage access takes them from the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import Failure
from schemas.contract import CANCEL_MARKER, RECORD_FILE, SPEC_FILE, RunPaths, atomic_write

__all__ = ["CANCEL_MARKER", "RECORD_FILE", "SPEC_FILE", "RunPaths", "RunRecord", "atomic_write"]


@dataclass
class RunRecord:
    run_id: str
    name: str
    spec_hash: str
    created: float
    executor: str  # "slurm" or "local"
    run_dir: str
    workdir: str  # the trainer's cwd: relative data paths in the spec resolve against it
    checkpoint_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    attempts: list[str] = field(default_factory=list)  # job ids, oldest first
    submitted: dict[str, float] = field(default_factory=dict)  # job id -> submission time
    cancelled: list[str] = field(default_factory=list)  # job ids the user cancelled
    forgotten_nodes: dict[str, float] = field(default_factory=dict)  # node -> when --include-node forgave it
    version: str = ""
    sweep_id: str = ""  # the sweep this run is a member of ("" for none)
    sweep_values: dict[str, Any] = field(default_factory=dict)  # its swept spec values, key -> value

    @property
    def nodes(self) -> int:
        return int(self.resources.get("nodes", 1))

    @property
    def gpus_per_node(self) -> int:
        return int(self.resources.get("gpus_per_node", 0))

    @property
    def latest_job(self) -> str | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)

    @property
    def spec_path(self) -> Path:
        return self.paths.spec

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunRecord:
        return cls.from_dict(json.loads(text))

    def created_iso(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.created))


def write_local(record: RunRecord) -> None:
    atomic_write(record.paths.record, record.to_json().encode())


def read_local(run_dir: Path) -> RunRecord:
    return RunRecord.from_json(RunPaths(run_dir).record.read_bytes())


class RunBusy(Failure):
    """Another pixpro held the run's lock for all of :data:`LOCK_WAIT_S`."""


LOCK_WAIT_S = 120.0
_held = threading.local()  # the run locks this thread holds: taking one again is a no-op


@contextlib.contextmanager
def run_lock(record: RunRecord, wait_s: float | None = None) -> Iterator[None]:
    """Exclusive, across processes, while an attempt of the run is chosen and queued or cancelled: two
    ``pixpro resume`` at once would each queue one and the record keep only the last. Re-entrant in
    one thread (a sweep's resume holds it around :func:`cluster.runs.resume`, which takes it too)."""
    path = record.paths.start_lock
    held: set[Path] = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    with open(path, "a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RunBusy(
                        f"run {record.run_id} is being resumed or cancelled by another pixpro ({path} held "
                        f"for {wait_s:.0f} s); try again"
                    ) from None
                time.sleep(0.05)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            fcntl.flock(f, fcntl.LOCK_UN)
