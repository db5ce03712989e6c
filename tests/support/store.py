"""Checkpoint stores for tests: one protocol suite runs against a local folder and against S3 (moto)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.store import MANIFEST, CheckpointStore, Manifest
from launch.store.format import scan_layout, step_of


def payload(step: int, rank: int, size: int = 4096) -> bytes:
    return (f"step={step} rank={rank};".encode() * size)[:size]


def save(store: CheckpointStore, step: int, world: int = 2, size: int = 4096, **meta: Any) -> Manifest:
    """Every rank's file of ``step`` written, then committed (what the trainer's ranks do together)."""
    entries = [store.write(step, f"rank{r}.pt", payload(step, r, size)) for r in range(world)]
    return store.commit(step, entries, {"world_size": world, "spec_hash": "abc", **meta}, wait_s=10)


def committed_steps(store: CheckpointStore) -> list[int]:
    """Steps with a manifest (not validated), read from the store's listing: what a person would see."""
    layout = scan_layout(store._backend.scan())
    return sorted({step_of(p) for p, files in layout.prefixes.items() if MANIFEST in files})


def committed_pointer(body: bytes) -> dict[str, Any] | None:
    """A raw ``latest`` object's pointer if it names a checkpoint (not only an attempt's claim)."""
    pointer = json.loads(body)
    return pointer if pointer.get("prefix") is not None else None


def local_pointer(ckpt: Path) -> dict[str, Any] | None:
    """The pointer of a local store's ``latest`` if it names a checkpoint; None before the first commit
    (or while it is being replaced)."""
    try:
        return committed_pointer((ckpt / "latest").read_bytes())
    except (OSError, ValueError):
        return None


@dataclass
class Target:
    """A fresh, empty store location and a raw handle on it, to tamper with objects behind the store."""

    kind: str
    url: str
    options: dict[str, Any]
    root: Path | None = None  # local
    fs: Any = None  # s3: a plain s3fs filesystem straight to the server

    def store(self, **kw: Any) -> CheckpointStore:
        return CheckpointStore(self.url, self.options, **kw)

    def _key(self, rel: str) -> str:
        return f"{self.url.removeprefix('s3://')}/{rel}"

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes() if self.root else self.fs.cat_file(self._key(rel))

    def write(self, rel: str, data: bytes) -> None:
        if self.root:
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(data)
        else:
            self.fs.pipe_file(self._key(rel), data)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists() if self.root else bool(self.fs.exists(self._key(rel)))

    def remove_folder(self, rel: str) -> None:
        if self.root:
            shutil.rmtree(self.root / rel)
        else:
            self.fs.rm(self._key(rel), recursive=True)

    def top(self) -> list[str]:
        """Names directly under the store root."""
        if self.root:
            return sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.url, refresh=True))

    def latest(self) -> dict[str, Any]:
        return json.loads(self.read("latest"))
