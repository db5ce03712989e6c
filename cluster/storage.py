"""Read and write small files in a run's checkpoint folder, local or on an object store.

Plain paths use pathlib (``pixpro status`` stays fast: no fsspec/s3fs import); URLs go through
fsspec with the spec's storage options, credentials from the environment (AWS_* and friends).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Protocol

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_local(url: str) -> bool:
    match = _SCHEME.match(url)
    return match is None or match.group(1).lower() == "file"


def absolute_url(url: str, base: Path) -> str:
    """A plain relative path made absolute (the trainer and the CLI may run in different folders)."""
    if _SCHEME.match(url):
        return url
    return str((base / Path(url).expanduser()).absolute())


class Store(Protocol):
    url: str

    def cat(self, name: str) -> bytes | None: ...
    def pipe(self, name: str, data: bytes) -> None: ...
    def exists(self, name: str) -> bool: ...
    def listdir(self, name: str = "") -> list[str]: ...
    def mtime(self, name: str) -> float | None: ...
    def delete(self, name: str) -> None: ...


class LocalStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.root = Path(url[len("file://") :] if url.lower().startswith("file://") else url)

    def cat(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def pipe(self, name: str, data: bytes) -> None:
        from cluster.record import atomic_write

        atomic_write(self.root / name, data)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def listdir(self, name: str = "") -> list[str]:
        try:
            return sorted(p.name for p in (self.root / name).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def mtime(self, name: str) -> float | None:
        try:
            return (self.root / name).stat().st_mtime
        except OSError:
            return None

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class RemoteStore:
    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = self.root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def cat(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None

    def pipe(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self._path(name)))

    def listdir(self, name: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._path(name), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def mtime(self, name: str) -> float | None:
        try:
            info = self.fs.info(self._path(name))
        except FileNotFoundError:
            return None
        value = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        if value is None:
            return None
        return value.timestamp() if hasattr(value, "timestamp") else float(value)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    if is_local(url):
        return LocalStore(url)
    return RemoteStore(url, storage_options or {})
