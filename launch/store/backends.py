"""Storage backends: the few primitives the commit protocol needs, with the atomicity each storage
actually offers. Keys are relative to the store root and use "/"."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from launch.store.format import StoreError, one_line

log = logging.getLogger("launch.store")


class Backend(Protocol):
    kind: str

    def put(self, rel: str, data: bytes) -> None:
        """Write a whole object; never leaves a partial object under ``rel``; verifies the size."""

    def put_if(self, rel: str, data: bytes, token: str | None) -> bool:
        """Conditional write: ``token=None`` means create-only; False on conflict (HTTP 412)."""

    def get(self, rel: str) -> tuple[bytes, str] | None:
        """Bytes and the version token for ``put_if``, or None when absent."""

    def read(self, rel: str) -> bytes | None: ...

    def exists(self, rel: str) -> bool: ...

    def scan(self, sub: str = "") -> dict[str, int]:
        """Relative key -> size for the objects under ``sub`` (two levels below the root)."""

    def delete(self, rels: list[str]) -> None: ...

    def open_sink(self, rel: str) -> Sink:
        """A streaming writer for ``rel``: the object appears whole at ``finish`` or not at all."""

    def close(self) -> None: ...


class Sink(Protocol):
    """One object written in pieces with bounded memory; ``abort`` leaves nothing under its name."""

    def write(self, chunk: memoryview) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class BufferSink:
    """For backends without a streaming upload: collect the pieces, then one whole-object ``put``."""

    def __init__(self, backend: Any, rel: str) -> None:
        self.backend, self.rel, self.buf = backend, rel, bytearray()

    def write(self, chunk: memoryview) -> None:
        self.buf += chunk

    def finish(self) -> None:
        self.backend.put(self.rel, bytes(self.buf))

    def abort(self) -> None:
        self.buf = bytearray()


class FileSink:
    """A temp file beside the target, fsynced and renamed over it at ``finish``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.size = path, 0
        self.tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        self.f = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish/abort)

    def write(self, chunk: memoryview) -> None:
        with _naming(self.path):
            self.f.write(chunk)
        self.size += len(chunk)

    def finish(self) -> None:
        try:
            with _naming(self.path):
                self.f.flush()
                os.fsync(self.f.fileno())
                self.f.close()
                os.replace(self.tmp, self.path)
        finally:
            self.abort()
        _fsync_dir(self.path.parent)
        size = self.path.stat().st_size
        if size != self.size:
            raise StoreError(f"{self.path.name}: wrote {self.size} bytes but {size} are on disk")

    def abort(self) -> None:
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class HashCAS:
    """Compare-and-swap for backends without conditional writes: the token is the sha256 of the
    content, and ``put_if`` reads, compares and writes under the backend's ``_cas_lock()``."""

    def _cas_lock(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def get(self, rel: str) -> tuple[bytes, str] | None:
        data = self.read(rel)  # type: ignore[attr-defined]
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def put_if(self, rel: str, data: bytes, token: str | None) -> bool:
        """``token`` None means create-only; otherwise the current token must equal it."""
        with self._cas_lock():
            cur = self.get(rel)
            if (cur is not None) if token is None else (cur is None or cur[1] != token):
                return False
            self.put(rel, data)  # type: ignore[attr-defined]
            return True


_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


class LocalBackend(HashCAS):
    """A local (or shared POSIX) folder: temp file + fsync + os.replace; CAS under fcntl + thread lock."""

    kind = "local"

    def __init__(self, root: str) -> None:
        self.root = Path(root).expanduser().absolute()
        with _LOCAL_LOCKS_GUARD:
            self._tlock = _LOCAL_LOCKS.setdefault(str(self.root), threading.Lock())

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def put(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            with _naming(path), open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(path.parent)
        size = path.stat().st_size
        if size != len(data):
            raise StoreError(f"{rel}: wrote {len(data)} bytes but {size} are on disk")

    def open_sink(self, rel: str) -> Sink:
        return FileSink(self._path(rel))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # fcntl locks are per process, so threads of one process also need a thread lock.
        self.root.mkdir(parents=True, exist_ok=True)
        with self._tlock, open(self.root / ".lock", "a+b") as lf:
            fcntl.lockf(lf, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(lf, fcntl.LOCK_UN)

    def _cas_lock(self) -> contextlib.AbstractContextManager[None]:
        return self._locked()

    def read(self, rel: str) -> bytes | None:
        try:
            return self._path(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def scan(self, sub: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        if sub:  # everything below one folder
            for dirpath, _dirs, files in os.walk(self._path(sub)):
                rel_dir = Path(dirpath).relative_to(self.root).as_posix()
                for n in files:
                    with contextlib.suppress(FileNotFoundError):
                        out[f"{rel_dir}/{n}"] = (Path(dirpath) / n).stat().st_size
            return out
        try:
            top = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for e in top:  # the root and one level of folders is all the layout has
            with contextlib.suppress(FileNotFoundError):
                if e.is_file():
                    out[e.name] = e.stat().st_size
                elif e.is_dir():
                    inner = [(f.name, f.stat().st_size) for f in os.scandir(e.path) if f.is_file()]
                    out[f"{e.name}/"] = 0  # keeps empty or nested foreign folders visible
                    out.update({f"{e.name}/{n}": s for n, s in inner})
        return out

    def delete(self, rels: list[str]) -> None:
        parents = set()
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                self._path(rel).unlink()
            parents.add(self._path(rel).parent)
        for p in parents:
            if p != self.root:
                for leftover in p.glob(".*.tmp-*"):
                    with contextlib.suppress(FileNotFoundError):
                        leftover.unlink()
                with contextlib.suppress(OSError):
                    p.rmdir()

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A write error (ENOSPC from write(2) carries no file name) names the file it was for."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsspecBackend(HashCAS):
    """Any other fsspec filesystem: no conditional writes there, so CAS is only safe within a process."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")
        proto = fs.protocol
        self.kind = proto if isinstance(proto, str) else proto[0]
        self._lock = threading.Lock()
        log.warning(
            "checkpoint store on %s:// has no conditional writes: 'latest' is moved by read-compare-write, "
            "safe only within one process",
            self.kind,
        )

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def put(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(rel), data)
        size = self.fs.size(self._p(rel))
        if size != len(data):
            raise StoreError(f"{rel}: wrote {len(data)} bytes but the store holds {size}")

    def _cas_lock(self) -> contextlib.AbstractContextManager[bool]:
        return self._lock

    def open_sink(self, rel: str) -> Sink:
        return BufferSink(self, rel)

    def read(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._p(rel))
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return bool(self.fs.isfile(self._p(rel)))

    def scan(self, sub: str = "") -> dict[str, int]:
        base = self._p(sub) if sub else self.root
        try:
            found = self.fs.find(base, detail=True, maxdepth=None if sub else 2)
        except FileNotFoundError:
            return {}
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        return {
            p[len(root) :]: int(i.get("size") or 0)
            for p, i in found.items()
            if p.startswith(root) and i.get("type") == "file"
        }

    def delete(self, rels: list[str]) -> None:
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._p(rel))

    def close(self) -> None:
        pass


def exc_chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_precondition_failure(e: BaseException) -> bool:
    """412 PreconditionFailed (or 409 ConditionalRequestConflict) anywhere in the chain; s3fs maps the
    If-None-Match case to FileExistsError and the If-Match case to a bare OSError(EINVAL)."""
    for x in exc_chain(e):
        resp = getattr(x, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") or status in (
                412,
                409,
            ):
                return True
    return False


_DISK_ERRNOS = {
    errno.ENOSPC: "disk full (no space left on the device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_HTTP_HINTS = {
    403: "check the credentials and the bucket's policy",
    404: "check the bucket name and the endpoint",
    400: "check the endpoint and the region",
}


def failure_cause(
    e: BaseException,
    *,
    connect_s: float | None = None,
    read_s: float | None = None,
    deadline_s: float | None = None,
) -> str:
    """The cause of a store failure in words a person can act on, from the deepest exception that says
    it: full or read-only disk, HTTP status and S3 error code, reset, refused, which timeout. Serializers
    (torch's "unexpected pos") and wrappers only report a broken stream; the raw chain belongs in the
    debug log."""
    chain = list(exc_chain(e))
    for x in chain:
        if isinstance(x, OSError) and x.errno in _DISK_ERRNOS:
            where = f": {x.filename}" if getattr(x, "filename", None) else ""
            return f"{_DISK_ERRNOS[x.errno]}{where}"
    for x in chain:
        resp = getattr(x, "response", None)
        if isinstance(resp, dict) and (resp.get("Error") or resp.get("ResponseMetadata")):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            err = resp.get("Error", {})
            code, message = err.get("Code") or "?", one_line(err.get("Message") or "", 120)
            hint = _HTTP_HINTS.get(status or 0, "")
            text = f"the store answered HTTP {status} {code}" + (f" ({message})" if message else "")
            return text + (f": {hint}" if hint else "")
    names = {type(x).__name__ for x in chain}
    errnos = {getattr(x, "errno", None) for x in chain}
    text = " ".join(str(x) for x in chain).lower()
    deadline = f"; call deadline {deadline_s:.0f} s" if deadline_s is not None else ""
    if errno.ECONNRESET in errnos or "ConnectionResetError" in names or "connection reset" in text:
        return "the connection was reset by the store (or a proxy on the way)"
    if errno.ECONNREFUSED in errnos or "ConnectionRefusedError" in names or "connection refused" in text:
        return "the store refused the connection (nothing listens at the endpoint)"
    if "ConnectTimeoutError" in names:
        within = f" within {connect_s:g} s" if connect_s is not None else ""
        return f"no connection to the store{within} (connect timeout{deadline})"
    if "ReadTimeoutError" in names:
        within = f" for {read_s:g} s" if read_s is not None else ""
        return f"the store stopped answering{within} (read timeout{deadline})"
    if names & {"FSTimeoutError", "TimeoutError", "CancelledError"}:
        within = f" within {deadline_s:.0f} s" if deadline_s is not None else ""
        return f"the store call did not finish{within} (deadline: the store stalled)"
    if names & {"ServerDisconnectedError", "IncompleteRead", "ClientPayloadError", "ResponseStreamingError"}:
        return "the store closed the connection mid-answer"
    if "EndpointConnectionError" in names or "ClientConnectorError" in names:
        return "could not connect to the store's endpoint"
    return f"{type(e).__name__}: {one_line(str(e), 160)}"
