"""The on-store format of checkpoints: names, the manifest, the ``latest`` pointer, and how a listing of
the store reads as checkpoint prefixes. Torch-free: the CLI reads the same format through it."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.contract import AUX_TOP, LATEST
from schemas.contract import one_line as _one_line

FORMAT = "pixpro-checkpoint/1"
POINTER_FORMAT = "pixpro-latest/1"


PREFIX_RE = re.compile(r"^step-(\d{12})\.([A-Za-z0-9_.-]{1,64})$")
ATTEMPT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$")
AUX_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}){0,3}$")
MAX_STEP = 10**12 - 1


class StoreError(Exception):
    """A checkpoint store operation failed (message is credential-free)."""


class CorruptCheckpoint(StoreError):
    """A committed checkpoint's file is missing, truncated or fails its checksum."""

    def __init__(self, step: int, prefix: str, reason: str) -> None:
        super().__init__(f"step {step} ({prefix}): {reason}")
        self.step, self.prefix, self.reason = step, prefix, reason


class CheckpointExists(StoreError):
    """The checkpoint prefix is already committed; attempt ids must be unique per launch."""


class Superseded(StoreError):
    """A later attempt has claimed the run (:meth:`CheckpointStore.claim`): this attempt is a stale one
    (its node lost SLURM but not the store) and must stop instead of moving ``latest``."""


class StoreUnavailable(StoreError, OSError):
    """The store could not be reached (connection refused/reset, stall) even after retries."""


class CommitTimeout(StoreError):
    """Some rank's file did not appear (with the right size) before ``wait_s`` ran out."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint as its writer saw it; the manifest is a list of these."""

    name: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        name, size, digest = d["name"], d["size"], d["sha256"]
        if not (isinstance(name, str) and NAME_RE.match(name)):
            raise ValueError(f"bad file name {name!r}")
        if not (isinstance(size, int) and size >= 0):
            raise ValueError(f"bad size for {name}")
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ValueError(f"bad sha256 for {name}")
        return cls(name, size, digest)


@dataclass(frozen=True)
class Manifest:
    """The commit marker of one checkpoint: what a complete checkpoint consists of."""

    step: int
    prefix: str
    attempt: str
    created: float
    files: tuple[FileEntry, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files)

    def entry(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(f"step {self.step} ({self.prefix}) has no file {name!r}; it has {list(self.names)}")

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "step": self.step,
            "prefix": self.prefix,
            "attempt": self.attempt,
            "created": self.created,
            "files": [f.to_dict() for f in self.files],
            "meta": self.meta,
        }
        return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, body: bytes) -> Manifest:
        try:
            doc = json.loads(body)
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
            files = tuple(FileEntry.from_dict(f) for f in doc["files"])
            if len({f.name for f in files}) != len(files):
                raise ValueError("duplicate file names")
            meta = doc.get("meta") or {}
            if not isinstance(meta, dict) or not isinstance(doc["step"], int):
                raise ValueError("bad step or meta")
            return cls(
                int(doc["step"]), str(doc["prefix"]), str(doc["attempt"]), float(doc["created"]), files, meta
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(one_line(f"{type(e).__name__}: {e}")) from None


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_local_url(url: str) -> bool:
    """A plain path or ``file://`` URL (read with pathlib, no fsspec import)."""
    match = _SCHEME.match(url)
    return match is None or match.group(1).lower() == "file"


def absolute_url(url: str, base: Path) -> str:
    """A plain relative path made absolute (the trainer and the CLI may run in different folders)."""
    if _SCHEME.match(url):
        return url
    return str((base / Path(url).expanduser()).absolute())


def one_line(text: str, limit: int = 300) -> str:
    """A store failure's cause on one line: cut longer than an error line, it is embedded in one."""
    return _one_line(text, limit)


def short(v: Any) -> str:
    return one_line(repr(v), 80)


@dataclass
class Layout:
    prefixes: dict[str, dict[str, int]]
    foreign: list[str]


def scan_layout(keys: dict[str, int]) -> Layout:
    prefixes: dict[str, dict[str, int]] = {}
    foreign: set[str] = set()
    for rel, size in keys.items():
        top, sep, rest = rel.partition("/")
        if not top or top.startswith(".") or top in AUX_TOP:
            continue  # our lock and temp files, auxiliary objects
        if not sep:
            if top != LATEST:
                foreign.add(top)
        elif not PREFIX_RE.match(top):
            foreign.add(top + "/")
        else:
            files = prefixes.setdefault(top, {})
            if rest and "/" not in rest and not rest.startswith("."):
                files[rest] = size
    return Layout(prefixes, sorted(foreign))


def step_of(prefix: str) -> int:
    m = PREFIX_RE.match(prefix)
    if not m:
        raise ValueError(f"not a checkpoint prefix: {prefix!r}")
    return int(m.group(1))


def step_order(prefix: str) -> tuple[int, str]:
    return step_of(prefix), prefix


# -- the latest pointer and the attempts' claims ------------------------------------------------------
def parse_pointer(body: bytes) -> dict[str, Any]:
    """``latest`` as stored: a checkpoint's step and prefix, or a claim alone (both None: a run without
    checkpoints yet), with the claim's ``generation`` (0 where written before claims); ValueError else."""
    try:
        ptr = json.loads(body)
        if ptr.get("format") != POINTER_FORMAT:
            raise ValueError("unexpected format")
    except AttributeError as e:
        raise ValueError(str(e)) from None
    ptr.setdefault("generation", 0)
    if not (isinstance(ptr["generation"], int) and ptr["generation"] >= 0):
        raise ValueError("bad generation")
    if ptr.get("prefix") is None and ptr.get("step") is None:
        return ptr
    if not isinstance(ptr.get("step"), int):
        raise ValueError("unexpected format")
    if step_of(str(ptr.get("prefix"))) != ptr["step"]:
        raise ValueError("step and prefix disagree")
    return ptr


def pointer_body(pointer: dict[str, Any]) -> bytes:
    return (json.dumps(pointer, sort_keys=True) + "\n").encode()


def claim_body(owner: str, generation: int) -> bytes:
    return (json.dumps({"owner": owner, "generation": generation, "time": time.time()}) + "\n").encode()


def claimed_generation(got: tuple[bytes, Any] | None) -> int | None:
    """The generation a claim record holds; None for no record (or an unreadable one: claim anew)."""
    try:
        generation = json.loads(got[0])["generation"] if got else None
    except (ValueError, KeyError, TypeError):
        return None
    return generation if isinstance(generation, int) else None


def same_commit(body: bytes, manifest: Manifest) -> bool:
    """Whether a stored manifest commits what ``manifest`` does: the same document but for its
    ``created`` (compared as JSON, as both were written)."""
    try:
        stored = json.loads(body)
    except ValueError:
        return False
    ours = json.loads(manifest.to_json())
    return isinstance(stored, dict) and {**stored, "created": None} == {**ours, "created": None}
