"""Where encoded images come from: a folder (local or any fsspec URL) or a packed dataset of tar shards.

Both are indexed by a global sample index in one fixed order and hold their per-sample data as flat
arrays, never one Python object per sample: 1.28 M names as ``pathlib.Path`` objects cost hundreds of MB,
copied on access into every DataLoader worker of every rank (reference counts touch the pages).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
PACK_FORMAT = "pixpro-pack/1"
PACK_MANIFEST = "manifest.json"
PACK_INDEX = "index.npz"

T = TypeVar("T")


class SourceError(ValueError):
    """A dataset location that cannot be used (missing, empty, not what it claims to be)."""


class ReadFailed(OSError):
    """One sample's bytes could not be read, even after retries (network, truncated shard)."""


class ImageSource(Protocol):
    """Encoded images by global index: the folder and the packed dataset look alike to the loader."""

    def __len__(self) -> int: ...
    def name(self, index: int) -> str: ...
    def label(self, index: int) -> int: ...
    def usable(self, index: int) -> bool: ...
    def read(self, index: int) -> bytes: ...


class Names:
    """Many short strings in two flat arrays (utf-8 bytes and offsets): constant Python objects, and
    the pages stay shared between forked DataLoader workers."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_list(cls, names: list[str]) -> Names:
        encoded = [n.encode() for n in names]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.blob[self.offsets[index] : self.offsets[index + 1]].tobytes().decode()


def split_url(root: str | os.PathLike[str]) -> tuple[str, str]:
    """(protocol, path): ``""`` for a plain or ``file://`` path."""
    text = os.fspath(root)
    if "://" not in text:
        return "", text
    protocol, _, rest = text.partition("://")
    return ("", rest) if protocol.lower() in ("file", "local") else (protocol.lower(), text)


def _filesystem(root: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    # no listings cache: a dataset's listing would stay in every rank (about 1.2 KB per image on S3) and
    # be dirtied again by each forked loader worker; samples are read by exact path
    fs, path = fsspec.core.url_to_fs(root, **{"use_listings_cache": False, **(storage_options or {})})
    if hasattr(fs, "retries"):  # s3fs: one try per call; _retrying's loop retries within a deadline
        fs.retries = 1
    return fs, path.rstrip("/")


class _Remote:
    """An fsspec filesystem made again in each process: one created before a DataLoader forks its workers
    holds an event loop and connections that do not survive the fork (a worker would hang on them)."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None) -> None:
        self.root, self.options = root, dict(storage_options or {})
        self.fs, self.base = _filesystem(root, self.options)
        self.pid = os.getpid()

    def __call__(self) -> Any:
        if self.pid != os.getpid():
            self.fs, _ = _filesystem(self.root, {**self.options, "skip_instance_cache": True})
            self.pid = os.getpid()
        return self.fs

    def __getstate__(self) -> dict[str, Any]:  # spawned workers rebuild it on first use
        return {"root": self.root, "options": self.options, "fs": None, "base": self.base, "pid": -1}


def _walk_local(root: Path) -> list[str]:
    """Image files under ``root`` by relative path; a folder reached twice via links is read once."""
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle or a folder linked twice
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()  # visit order decides which of two links to one folder is kept
        rel = Path(dirpath).relative_to(root).as_posix()
        found.extend(
            f if rel == "." else f"{rel}/{f}" for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES
        )
    return sorted(found)


def class_labels(names: list[str]) -> tuple[list[str], np.ndarray]:
    """ImageNet layout: the first folder of a relative path is its class (sorted); flat files get -1."""
    classes = sorted({n.split("/", 1)[0] for n in names if "/" in n})
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup[n.split("/", 1)[0]] if "/" in n else -1 for n in names], dtype=np.int32)
    return classes, labels


class FolderSource:
    """Every JPEG/PNG under a folder or URL (class subfolders or flat), in relative-path order."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        self.root = os.fspath(root)
        protocol, path = split_url(root)
        self._fs: _Remote | None = None
        self._sizes = np.zeros(0, dtype=np.int64)  # an object store's listing gives them for free
        if protocol:
            self._fs = _Remote(self.root, storage_options)
            self._base = self._fs.base
            fs = self._fs()
            try:
                listing = _retrying(lambda: fs.find(self._base, detail=True), self.root)
            except FileNotFoundError:
                listing = {}
            if not listing and not _retrying(lambda: fs.exists(self._base), self.root):
                raise SourceError(f"dataset folder {self.root} does not exist")
            strip = len(self._base) + 1
            found = sorted(
                (p[strip:], int(info.get("size") or 0))
                for p, info in listing.items()
                if Path(p).suffix.lower() in IMAGE_SUFFIXES
            )
            del listing
            names = [name for name, _ in found]
            self._sizes = np.array([size for _, size in found], dtype=np.int64)
        else:
            self._base = path
            local = Path(path)
            if not local.exists():
                raise SourceError(f"dataset folder {self.root} does not exist")
            if not local.is_dir():
                raise SourceError(f"dataset path {self.root} is not a folder")
            names = _walk_local(local)
        if not names:
            raise SourceError(f"no JPEG or PNG images under {self.root}")
        _, self._labels = class_labels(names)
        self._names = Names.from_list(names)
        self._identity: str | None = None

    def identity(self) -> str:
        """What this dataset is, for a cache to be keyed by: its location and listing (the same names under
        another root may be other images)."""
        if self._identity is None:
            where = self.root if self._fs is not None else os.path.realpath(self._base)
            digest = hashlib.sha256(f"folder\n{where}\n{len(self)}\n".encode())
            digest.update(self._names.offsets.tobytes())
            digest.update(self._names.blob.tobytes())
            self._identity = digest.hexdigest()
        return self._identity

    def length(self, index: int) -> int | None:
        """The sample's size where the listing gave it (an object store's) without a stat per file."""
        return int(self._sizes[index]) if self._fs is not None else None

    def __len__(self) -> int:
        return len(self._names)

    def name(self, index: int) -> str:
        return self._names[index]

    def path(self, index: int) -> str:
        return f"{self._base}/{self._names[index]}"

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def usable(self, index: int) -> bool:
        return True

    def read(self, index: int) -> bytes:
        if self._fs is None:
            return _retrying_local(lambda: Path(self.path(index)).read_bytes(), self.path(index))
        fs = self._fs()  # start=0: one GET (without a range s3fs asks for the size first: a HEAD)
        return _retrying(lambda: bytes(fs.cat_file(self.path(index), start=0)), self.path(index))


class PackedSource:
    """A packed dataset (``pixpro pack``): tar shards, a flat index, and a manifest written last.

    Each sample is one range read of its shard (no scanning, no tar parsing at read time). Local shards
    are read with ``os.pread`` on a per-process file handle; remote ones with fsspec range reads, retried
    within a deadline.
    """

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        self.root = os.fspath(root).rstrip("/")
        protocol, path = split_url(self.root)
        self._fs: _Remote | None = None
        if protocol:
            self._fs = _Remote(self.root, storage_options)
            self._base = self._fs.base
        else:
            self._base = path
        manifest = self._read_small(PACK_MANIFEST)
        if manifest is None:
            raise SourceError(f"{self.root} holds no packed dataset ({PACK_MANIFEST} is missing)")
        try:
            self.manifest = json.loads(manifest)
            if self.manifest.get("format") != PACK_FORMAT:
                raise ValueError(f"format {self.manifest.get('format')!r}")
            index = np.load(io.BytesIO(self._read_small(PACK_INDEX) or b""), allow_pickle=False)
            self._shard = index["shard"]
            self._offset = index["offset"]
            self._length = index["length"]
            self._labels = index["label"]
            self._names = Names(index["name_blob"], index["name_offsets"])
        except (ValueError, KeyError, OSError) as exc:
            raise SourceError(f"{self.root}: unreadable pack index or manifest ({exc})") from None
        self.shards: list[str] = [s["name"] for s in self.manifest["shards"]]
        sizes = [int(s["size"]) for s in self.manifest["shards"]]
        n = len(self._names)
        if not (n == len(self._shard) == len(self._offset) == self.manifest.get("samples")):
            raise SourceError(f"{self.root}: the index does not match its manifest ({n} entries)")
        ends = self._offset + self._length
        if n and (self._shard.max() >= len(sizes) or np.any(ends > np.asarray(sizes)[self._shard])):
            raise SourceError(f"{self.root}: the index points past the end of a shard")
        self._handles: dict[int, int] = {}
        self._pid = os.getpid()

    def identity(self) -> str:
        """What this dataset is, for a cache to be keyed by: the index and shard digests its manifest
        records (a copy of the pack elsewhere is the same dataset)."""
        shards = ",".join(str(s.get("sha256")) for s in self.manifest["shards"])
        text = f"pack\n{(self.manifest.get('index') or {}).get('sha256')}\n{len(self)}\n{shards}"
        return hashlib.sha256(text.encode()).hexdigest()

    def length(self, index: int) -> int | None:
        return int(self._length[index])

    def _read_small(self, rel: str) -> bytes | None:
        try:
            if self._fs is None:
                return Path(self._base, rel).read_bytes()
            fs = self._fs()
            return _retrying(lambda: bytes(fs.cat_file(f"{self._base}/{rel}", start=0)), rel)
        except FileNotFoundError:
            return None

    def __len__(self) -> int:
        return len(self._names)

    def name(self, index: int) -> str:
        return self._names[index]

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def usable(self, index: int) -> bool:
        """False for a source file the packer could not decode: kept in the index (so indices match the
        folder it came from) and skipped at load time, like a corrupt file in a folder."""
        return bool(self._length[index] > 0)

    def read(self, index: int) -> bytes:
        shard, start, length = int(self._shard[index]), int(self._offset[index]), int(self._length[index])
        path = f"{self._base}/{self.shards[shard]}"
        if self._fs is None:
            data = _retrying_local(lambda: self._pread(shard, path, length, start), path)
        else:
            fs = self._fs()
            data = _retrying(lambda: bytes(fs.cat_file(path, start=start, end=start + length)), path)
        if len(data) != length:
            raise ReadFailed(f"{path}: {len(data)} of {length} bytes at offset {start} (truncated shard?)")
        return data

    def _pread(self, shard: int, path: str, length: int, start: int) -> bytes:
        """One range of a local shard through this process's handle; a handle that failed (ESTALE after
        a server failover, say) is closed so that the next try opens the file again."""
        if self._pid != os.getpid():  # forked into a DataLoader worker: the handles are the parent's
            self._handles, self._pid = {}, os.getpid()
        fd = self._handles.get(shard)
        try:
            if fd is None:
                fd = self._handles[shard] = os.open(path, os.O_RDONLY)
            return os.pread(fd, length, start)
        except OSError:
            failed = self._handles.pop(shard, None)
            if failed is not None:
                os.close(failed)
            raise


def open_source(
    root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> FolderSource | PackedSource:
    """A packed dataset where ``root`` holds a pack manifest, else a folder of images."""
    protocol, path = split_url(root)
    if protocol:
        fs, base = _filesystem(os.fspath(root), storage_options)
        packed = _retrying(lambda: fs.exists(f"{base}/{PACK_MANIFEST}"), f"{root}/{PACK_MANIFEST}")
    else:
        packed = Path(path, PACK_MANIFEST).is_file()
    return PackedSource(root, storage_options) if packed else FolderSource(root, storage_options)


READ_TRIES = 4
READ_DEADLINE_S = 60.0
LOCAL_READ_TRIES = 6  # 6.2 s of back-off: a parallel filesystem's client recovering from an eviction
_PERMANENT = (PermissionError, IsADirectoryError, NotADirectoryError)


def _retrying_local(fn: Callable[[], T], what: str) -> T:
    """A read of a local or mounted file: Lustre, GPFS and NFS answer EIO, ESTALE or even ENOENT for a
    few seconds while a server fails over, so every OSError but a permission or path-type one is retried
    and then reported as :class:`ReadFailed` (tried again later, never taken as a bad image)."""
    return _retrying(fn, what, tries=LOCAL_READ_TRIES, final=_PERMANENT)


def _retrying(
    fn: Callable[[], T],
    what: str,
    tries: int = READ_TRIES,
    final: tuple[type[BaseException], ...] = (FileNotFoundError,),
) -> T:
    """A call with a doubling back-off and an overall deadline; ``final`` errors are not retried
    (a remote object that is not there is not there)."""
    deadline = time.monotonic() + READ_DEADLINE_S
    delay = 0.2
    for attempt in range(tries):
        try:
            return fn()
        except final:
            raise
        except Exception as exc:  # transport errors of any fsspec backend, OSErrors of a local one
            if attempt == tries - 1 or time.monotonic() + delay > deadline:
                raise ReadFailed(
                    f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                ) from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class CachedSource:
    """Keeps the encoded bytes of samples once read (the official code's ``--cache-mode part``, bounded).

    ``memory``: a dict in each loader process, up to ``max_bytes`` per process. ``disk``: one file per
    sample in a subfolder of ``folder`` (node-local storage) named by the dataset's identity, so runs on
    other data that share ``folder`` never read each other's samples; shared by every rank and loader
    worker of the node; the total is bounded by ``max_bytes`` through a counter in that subfolder under an
    ``fcntl`` lock. Samples are added until the bound is reached, never evicted (no churn). A miss reads
    the wrapped source; the cache never changes what a sample is: the bytes are the source's, and a hit
    whose length differs from the one the source knows is read again.
    """

    def __init__(self, source: ImageSource, mode: str, max_bytes: int, folder: str | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"cache mode {mode!r} must be 'memory' or 'disk'")
        if mode == "disk" and not folder:
            raise ValueError("a disk cache needs a folder (node-local storage)")
        self.source, self.mode, self.max_bytes = source, mode, int(max_bytes)
        self.folder = Path(folder, _identity(source)[:24]) if mode == "disk" and folder else None
        self._memory: dict[int, bytes] = {}
        self._held = 0
        self.hits = self.misses = 0
        # no more disk puts in this process: after a failed write (ENOSPC, EFBIG; the sample was read all
        # the same) or once a sample did not fit (never evicting, the budget only grows: no more locks)
        self._disk_off = False
        self._budget = (-1, -1)  # (fd of .budget, the pid that opened it)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        return self.source.name(index)

    def label(self, index: int) -> int:
        return self.source.label(index)

    def usable(self, index: int) -> bool:
        return self.source.usable(index)

    def _file(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{index // 4096:05d}" / f"{index}.bin"

    def read(self, index: int) -> bytes:
        cached = self._memory.get(index) if self.mode == "memory" else self._disk_get(index)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        data = self.source.read(index)
        if self.mode == "memory":
            if self._held + len(data) <= self.max_bytes:
                self._memory[index] = data
                self._held += len(data)
        elif not self._disk_off:
            try:
                self._disk_put(index, data)
            except OSError as exc:  # a full or failing cache disk: train on, uncached
                self._disk_off = True
                warnings.warn(f"disk cache {self.folder}: {exc}; caching stops in this process", stacklevel=2)
        return data

    def _disk_get(self, index: int) -> bytes | None:
        try:
            data = self._file(index).read_bytes()
        except OSError:  # not cached, or a cache disk that fails: the source has the sample
            return None
        expected = _length(self.source, index)
        return None if expected is not None and len(data) != expected else data

    def _disk_put(self, index: int, data: bytes) -> None:
        """Reserve the bytes in the node's budget, then write the sample outside the lock: the lock is
        held for a read and a rewrite in place of one fixed-width number, not for a file write."""
        if not self._reserve(len(data)):
            self._disk_off = True
            return
        path = self._file(index)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)  # whole or absent: a reader never sees a partial sample
        except OSError:
            tmp.unlink(missing_ok=True)  # its reservation stays counted: the bound errs on the safe side
            raise

    def _reserve(self, size: int) -> bool:
        """Add ``size`` to the counter in ``.budget`` (shared by the node's processes) if it fits."""
        import fcntl

        fd = self._budget_fd()
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            used = int(os.pread(fd, _BUDGET_WIDTH, 0).strip() or b"0")
            if used + size > self.max_bytes:
                return False
            os.pwrite(fd, str(used + size).rjust(_BUDGET_WIDTH).encode(), 0)
            return True
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def _budget_fd(self) -> int:
        """This process's handle on ``.budget`` (a forked loader worker opens its own)."""
        assert self.folder is not None
        if self._budget[1] != os.getpid():
            self._budget = (os.open(self.folder / ".budget", os.O_RDWR | os.O_CREAT, 0o644), os.getpid())
        return self._budget[0]


_BUDGET_WIDTH = 20  # digits of the byte counter in .budget, rewritten in place


def _identity(source: ImageSource) -> str:
    """The source's own identity (:meth:`FolderSource.identity`), else its type and size."""
    identity = getattr(source, "identity", None)
    if callable(identity):
        return str(identity())
    return hashlib.sha256(f"{type(source).__qualname__}\n{len(source)}".encode()).hexdigest()


def _length(source: ImageSource, index: int) -> int | None:
    """The sample's length where the source knows it without reading it."""
    length = getattr(source, "length", None)
    return length(index) if callable(length) else None
