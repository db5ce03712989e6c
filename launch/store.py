"""Checkpoint storage on any fsspec URL that a crash, a preemption or a stale attempt cannot corrupt.

Object stores have no rename, and an exception inside ``with fs.open(path, "wb")`` on s3fs *completes*
the upload, so "write to a temp name then rename" does not exist there. This module instead follows the
protocol that DCP and Composer converged on:

Layout under the store URL::

    step-000000001234.<attempt>/rank0.pt      data files, one whole-object PUT each, size verified
    step-000000001234.<attempt>/manifest.json the commit marker: written LAST, create-only
    latest                                    {"step", "prefix", "manifest_sha256", ...}, moved by CAS
    status.json, run.json, metrics/, aux/     auxiliary objects (put_aux): never foreign, never pruned

* Every checkpoint gets a never-reused prefix: the attempt id is always part of it, so a stale attempt
  still uploading step 1234 can never mix its bytes into the new attempt's step 1234. ``attempt`` must
  therefore be unique per launch (e.g. ``f"{SLURM_JOB_ID}-{SLURM_RESTART_COUNT}"``); ``write`` refuses a
  prefix that already holds a manifest.
* ``commit`` waits until every rank's file is present with the right size, writes the manifest with
  ``If-None-Match: *`` and then moves ``latest`` by compare-and-swap (``If-Match: <etag>`` on S3, a temp
  file + ``os.replace`` under an fcntl lock on local disk), retrying on 412. ``latest`` only ever moves
  to a higher step (fencing), so an older attempt that is still running cannot roll it back. Old
  checkpoints are pruned only after that, never the one ``latest`` names.
* ``resolve``/``candidates`` trust ``latest`` only if its manifest validates (every file present, right
  size), else walk the other manifests newest first; every skipped candidate is one warning line.
  ``read`` verifies size and sha256 and raises :class:`CorruptCheckpoint`; ``load_latest`` falls back
  to the next older checkpoint when that happens.

S3 configuration (s3fs): credentials come from ``storage_options`` (``key``/``secret``/``token``), the
URL's userinfo (``s3://KEY:SECRET@bucket/run``, discouraged) or the botocore chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, profiles). The endpoint is, first match wins:
``storage_options["endpoint_url"]`` or ``storage_options["client_kwargs"]["endpoint_url"]``, then
``PIXPRO_S3_ENDPOINT`` (passed as ``client_kwargs={"endpoint_url": ...}``), then botocore's own
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``. Retries: botocore makes one attempt per call, since it draws
its retry jitter from the process-wide ``random`` module on whichever thread uploads, which would shift the
trainer's saved Python RNG stream with network weather; s3fs's own loop retries instead (5 tries, fixed
back-off) on transport errors, throttling and 5xx answers. Connect timeout 5 s, read timeout 30 s; every S3
operation has a wall-clock deadline (``timeout_s`` + 1 s per MiB), because aiohttp applies no read
timeout while it waits for ``100 Continue`` (botocore sends ``Expect: 100-continue`` on uploads): a
stalled server would otherwise hang a PUT forever. Credentials never reach manifests, ``latest``, log
lines or exception messages raised from this class.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

FORMAT = "pixpro-checkpoint/1"
POINTER_FORMAT = "pixpro-latest/1"
MANIFEST = "manifest.json"
LATEST = "latest"
# Top-level names of auxiliary objects that live beside the checkpoints without being part of one (run
# record, trainer status, metrics): never "foreign", never pruned, writable only through put_aux.
AUX_TOP = frozenset({"metrics", "status.json", "run.json", "aux"})

_PREFIX_RE = re.compile(r"^step-(\d{12})\.([A-Za-z0-9_.-]{1,64})$")
_ATTEMPT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$")
_AUX_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}){0,3}$")
# storage_options keys whose values are credentials (redacted everywhere).
_CRED_OPTION_RE = re.compile(r"key|secret|token|passw|username|credential", re.IGNORECASE)
# meta keys that must never be written into a manifest.
_CRED_META_RE = re.compile(r"secret|passw|token|credential|access_key|session_key", re.IGNORECASE)
_CRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_MIN_SECRET_LEN = 4
_MAX_STEP = 10**12 - 1

_S3_CONFIG_DEFAULTS: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 30}
_NO_BOTOCORE_RETRIES = {"total_max_attempts": 1, "mode": "standard"}  # its jitter uses the global random
_S3FS_RETRIES = 5  # s3fs's loop: fixed back-off 0.1 s x 1.7^i, no randomness
_JITTER = random.Random()  # the CAS back-off's own generator: never the trainer's saved stream
_MIN_BYTES_PER_S = 2**20  # the per-operation deadline grants 1 s per MiB on top of timeout_s
_CAS_MAX_TRIES = 100


class StoreError(Exception):
    """A checkpoint store operation failed (message is credential-free)."""


class CorruptCheckpoint(StoreError):
    """A committed checkpoint's file is missing, truncated or fails its checksum."""

    def __init__(self, step: int, prefix: str, reason: str) -> None:
        super().__init__(f"step {step} ({prefix}): {reason}")
        self.step, self.prefix, self.reason = step, prefix, reason


class CheckpointExists(StoreError):
    """The checkpoint prefix is already committed; attempt ids must be unique per launch."""


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
        if not (isinstance(name, str) and _NAME_RE.match(name)):
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
            raise ValueError(_one_line(f"{type(e).__name__}: {e}")) from None


# --------------------------------------------------------------------------------------------------
# Backends: the few primitives the protocol needs, with the atomicity each storage actually offers.
# Keys are relative to the store root and use "/".


class _Backend(Protocol):
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

    def close(self) -> None: ...


class _HashCAS:
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


class _LocalBackend(_HashCAS):
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
            with open(tmp, "wb") as f:
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _bounded(coro: Any, timeout: float) -> Any:
    import asyncio

    return await asyncio.wait_for(coro, timeout)


class _S3Backend:
    """S3 through s3fs's async API, with real conditional PUTs and a wall-clock deadline per call."""

    kind = "s3"

    def __init__(self, root: str, options: dict[str, Any], timeout_s: float) -> None:
        import s3fs
        from botocore.session import get_session

        members = get_session().get_service_model("s3").operation_model("PutObject").input_shape.members
        if "IfMatch" not in members or "IfNoneMatch" not in members:
            # s3fs silently drops kwargs the installed botocore does not know: the CAS would be unconditional.
            raise StoreError("botocore is too old for conditional PutObject (IfMatch/IfNoneMatch)")
        self.fs = s3fs.S3FileSystem(**options, skip_instance_cache=True, use_listings_cache=False)
        self.fs.retries = _S3FS_RETRIES
        s3fs.core.set_custom_error_handler(_is_transient)  # what botocore's retries would have covered
        self.timeout_s = timeout_s
        self.bucket, _, self.key_root = root.strip("/").partition("/")
        self.key_root = self.key_root.strip("/")
        if not self.bucket:
            raise ValueError("an s3:// URL needs a bucket")

    def _key(self, rel: str) -> str:
        return f"{self.key_root}/{rel}" if self.key_root else rel

    def _run(self, coro: Any, what: str, nbytes: int = 0) -> Any:
        from fsspec.asyn import sync

        deadline = self.timeout_s + nbytes / _MIN_BYTES_PER_S
        try:
            return sync(self.fs.loop, _bounded, coro, deadline)
        except (FileNotFoundError, FileExistsError, PermissionError):
            raise
        except Exception as e:
            if _is_transport_error(e):
                msg = _one_line(f"S3 {what} failed (deadline {deadline:.0f} s): {type(e).__name__}: {e}")
                raise StoreUnavailable(msg) from e
            raise

    def put(self, rel: str, data: bytes) -> None:
        key = self._key(rel)

        async def _put() -> int:
            # pipe_file: one PUT below 100 MiB, else a multipart upload that is aborted on error;
            # either way the object appears whole or not at all.
            await self.fs._pipe_file(f"{self.bucket}/{key}", data)
            head = await self.fs._call_s3("head_object", Bucket=self.bucket, Key=key)
            return int(head["ContentLength"])

        size = self._run(_put(), f"upload of {rel}", len(data))
        if size != len(data):
            raise StoreError(f"{rel}: wrote {len(data)} bytes but the store holds {size}")

    def put_if(self, rel: str, data: bytes, token: str | None) -> bool:
        cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        coro = self.fs._call_s3("put_object", Bucket=self.bucket, Key=self._key(rel), Body=data, **cond)
        try:
            self._run(coro, f"conditional write of {rel}", len(data))
        except FileNotFoundError:  # If-Match on a key deleted meanwhile
            return False
        except Exception as e:
            if _is_precondition_failure(e):
                return False
            raise
        return True

    def get(self, rel: str) -> tuple[bytes, str] | None:
        async def _get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(rel))
            try:
                data = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return data, resp["ETag"]

        for tries_left in (2, 1, 0):  # a body read cut off mid-stream is not retried by botocore
            try:
                return self._run(_get(), f"read of {rel}")
            except FileNotFoundError:
                return None
            except Exception as e:
                if tries_left == 0 or not _is_transport_error(e):
                    raise
                time.sleep(0.2)
        return None  # unreachable

    def read(self, rel: str) -> bytes | None:
        path = f"{self.bucket}/{self._key(rel)}"
        try:
            size = self._run(self.fs._size(path), f"size of {rel}")
            return self._run(self.fs._cat_file(path), f"read of {rel}", int(size or 0))
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        try:
            self._run(
                self.fs._call_s3("head_object", Bucket=self.bucket, Key=self._key(rel)), f"head of {rel}"
            )
        except FileNotFoundError:
            return False
        return True

    def scan(self, sub: str = "") -> dict[str, int]:
        base = "/".join(p for p in (self.bucket, self.key_root, sub) if p)
        found = self._run(self.fs._find(base, detail=True), f"listing of {sub or 'the store'}")
        strip = "/".join(p for p in (self.bucket, self.key_root) if p) + "/"
        out: dict[str, int] = {}
        for path, info in found.items():
            if path.startswith(base + "/") and info.get("type", "file") == "file":
                out[path[len(strip) :]] = int(info["size"])
        return out

    def delete(self, rels: list[str]) -> None:
        for i in range(0, len(rels), 1000):
            objs = [{"Key": self._key(r)} for r in rels[i : i + 1000]]
            self._run(
                self.fs._call_s3(
                    "delete_objects", Bucket=self.bucket, Delete={"Objects": objs, "Quiet": True}
                ),
                "delete",
            )

    def close(self) -> None:
        pass


class _FsspecBackend(_HashCAS):
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


def _exc_chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _is_precondition_failure(e: BaseException) -> bool:
    """412 PreconditionFailed (or 409 ConditionalRequestConflict) anywhere in the chain; s3fs maps the
    If-None-Match case to FileExistsError and the If-Match case to a bare OSError(EINVAL)."""
    for x in _exc_chain(e):
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


def _is_transport_error(e: BaseException) -> bool:
    """Connection refused/reset, timeouts, truncated bodies: worth a retry, not a sign of corruption."""
    import aiohttp
    import botocore.exceptions as bex

    kinds = (bex.ConnectionError, bex.HTTPClientError, aiohttp.ClientError, TimeoutError, ConnectionError)
    return any(isinstance(x, kinds) for x in _exc_chain(e))


def _is_transient(e: BaseException) -> bool:
    """Worth another try in s3fs's retry loop: transport errors, throttling, 5xx answers."""
    import botocore.exceptions as bex

    if _is_transport_error(e):
        return True
    if isinstance(e, bex.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(e.response.get("Error", {}).get("Code", ""))
        return status >= 500 or code in ("Throttling", "ThrottlingException", "RequestTimeout", "SlowDown")
    return False


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(v: Any) -> str:
    return _one_line(repr(v), 80)


@dataclass
class _Layout:
    prefixes: dict[str, dict[str, int]]
    foreign: list[str]


def _layout(keys: dict[str, int]) -> _Layout:
    prefixes: dict[str, dict[str, int]] = {}
    foreign: set[str] = set()
    for rel, size in keys.items():
        top, sep, rest = rel.partition("/")
        if not top or top.startswith(".") or top in AUX_TOP:
            continue  # our lock and temp files, auxiliary objects
        if not sep:
            if top != LATEST:
                foreign.add(top)
        elif not _PREFIX_RE.match(top):
            foreign.add(top + "/")
        else:
            files = prefixes.setdefault(top, {})
            if rest and "/" not in rest and not rest.startswith("."):
                files[rest] = size
    return _Layout(prefixes, sorted(foreign))


def _step_of(prefix: str) -> int:
    m = _PREFIX_RE.match(prefix)
    if not m:
        raise ValueError(f"not a checkpoint prefix: {prefix!r}")
    return int(m.group(1))


def _order(prefix: str) -> tuple[int, str]:
    return _step_of(prefix), prefix


# --------------------------------------------------------------------------------------------------


class CheckpointStore:
    """Checkpoints under one fsspec URL (local folder by default, ``s3://`` with real conditional writes).

    Torch-free: bytes in, bytes out. Each rank ``write``s its own file(s); one rank ``commit``s with all
    ranks' :class:`FileEntry` (e.g. gathered over the process group); any rank can ``resolve``/``read``.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        keep_last: int = 3,
        attempt: str = "0",
        *,
        timeout_s: float = 120.0,
    ) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        if not _ATTEMPT_RE.match(attempt):
            raise ValueError(f"attempt {attempt!r} must match {_ATTEMPT_RE.pattern}")
        self.keep_last = keep_last
        self.attempt = attempt
        options = dict(storage_options or {})
        protocol, path, userinfo, self.url = _split_url(url)
        self._secrets = _collect_secrets(options, userinfo)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self.cas_conflicts = 0  # how often moving 'latest' lost a race and retried (for tests/metrics)
        with self._guard():
            if protocol in ("", "file", "local"):
                self._backend: _Backend = _LocalBackend(path)
            elif protocol in ("s3", "s3a"):
                self._backend = _S3Backend(path, _s3_options(options, userinfo), timeout_s)
            else:
                import fsspec

                if userinfo:
                    options.setdefault("username", userinfo[0])
                    if userinfo[1]:
                        options.setdefault("password", userinfo[1])
                fs = fsspec.filesystem(protocol, **options)
                self._backend = _FsspecBackend(fs, fs._strip_protocol(f"{protocol}://{path}"))

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r}, backend={self._backend.kind}, attempt={self.attempt!r})"

    # -- writing ---------------------------------------------------------------------------------

    def prefix(self, step: int) -> str:
        """The never-reused folder of ``step`` for this attempt."""
        if not (isinstance(step, int) and 0 <= step <= _MAX_STEP):
            raise ValueError(f"step must be an int in [0, {_MAX_STEP}], got {step!r}")
        return f"step-{step:012d}.{self.attempt}"

    def write(
        self, step: int, name: str, data: bytes | bytearray | memoryview | Callable[[IO[bytes]], Any]
    ) -> FileEntry:
        """Upload one file of checkpoint ``step``; safe to call from a background thread.

        ``data`` is bytes, or a callable that writes into a binary file object (``lambda f: torch.save(
        state, f)``): it runs to completion in memory before anything is uploaded, so an exception in the
        serializer never leaves a partial object behind (unlike ``with fs.open(path, "wb")`` on s3fs).
        """
        if not (isinstance(name, str) and _NAME_RE.match(name)) or name == MANIFEST:
            raise ValueError(f"bad checkpoint file name {name!r}")
        prefix = self.prefix(step)
        if callable(data):
            buf = io.BytesIO()
            data(buf)
            payload = buf.getvalue()
        else:
            payload = bytes(data) if not isinstance(data, bytes) else data
        with self._guard():
            if self._backend.exists(f"{prefix}/{MANIFEST}"):
                raise CheckpointExists(
                    f"step {step} is already committed under {prefix}; use a new attempt id per launch"
                )
            digest = hashlib.sha256(payload).hexdigest()
            self._backend.put(f"{prefix}/{name}", payload)
        log.debug("%s: wrote %s/%s (%d bytes)", self.url, prefix, name, len(payload))
        return FileEntry(name, len(payload), digest)

    def write_async(
        self, step: int, name: str, data: bytes | Callable[[IO[bytes]], Any]
    ) -> Future[FileEntry]:
        """``write`` on the store's background thread, so training continues while the upload runs."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-write")
            return self._executor.submit(self.write, step, name, data)

    def commit(
        self, step: int, entries: list[FileEntry], meta: dict[str, Any], wait_s: float = 600
    ) -> Manifest:
        """Make ``step`` a checkpoint: wait for every rank's file, write the manifest, move ``latest``, prune.

        ``meta`` should carry what a resume must check (world size, spec hash, code version); it is
        stored as given (credential-like keys or values are refused). Raises :class:`CommitTimeout` if
        some file is still missing after ``wait_s``; nothing is committed then. ``latest`` is moved only
        forward: a commit of a step at or below the one ``latest`` names leaves it alone (logged) and
        returns the (valid, committed) manifest anyway; pruning happens only after a forward move.
        """
        prefix = self.prefix(step)
        entries = sorted(entries, key=lambda e: e.name)
        names = [e.name for e in entries]
        if not entries or len(set(names)) != len(names):
            raise ValueError("commit needs a non-empty list of entries with unique names")
        self._check_meta(meta)
        with self._guard():
            self._wait_for_files(step, prefix, entries, wait_s)
            manifest = Manifest(step, prefix, self.attempt, time.time(), tuple(entries), dict(meta))
            body = manifest.to_json()
            self._check_no_secrets(body)
            if not self._backend.put_if(f"{prefix}/{MANIFEST}", body, None):
                existing = self._backend.get(f"{prefix}/{MANIFEST}")
                # A retried PUT whose first try landed (response lost) gets 412 on its own manifest.
                if existing is None or existing[0] != body:
                    raise CheckpointExists(f"step {step}: {prefix}/{MANIFEST} already exists")
            moved = self._advance_latest(manifest, hashlib.sha256(body).hexdigest())
        if moved:
            try:
                self._prune()
            except Exception as e:  # the checkpoint is committed; a failed cleanup must not undo that
                log.warning(
                    "%s: pruning old checkpoints failed: %s", self.url, self._redact(_one_line(repr(e)))
                )
        log.info(
            "%s: committed step %d (%s, %d files)%s",
            self.url,
            step,
            prefix,
            len(entries),
            "" if moved else "; latest not moved",
        )
        return manifest

    def _wait_for_files(self, step: int, prefix: str, entries: list[FileEntry], wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        delay = 0.1
        while True:
            present = {k.partition("/")[2]: s for k, s in self._backend.scan(prefix).items()}
            problems = [
                f"{e.name} (absent)"
                if e.name not in present
                else f"{e.name} ({present[e.name]} of {e.size} bytes)"
                for e in entries
                if present.get(e.name) != e.size
            ]
            if not problems:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommitTimeout(
                    f"step {step}: after {wait_s:g} s still waiting for {len(problems)} file(s): "
                    + _one_line(", ".join(problems), 200)
                )
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 5.0)

    def _read_pointer(self) -> tuple[dict[str, Any] | None, str | None, str | None]:
        """(pointer, token, problem): a missing ``latest`` is normal, a garbled one is a problem."""
        got = self._backend.get(LATEST)
        if got is None:
            return None, None, None
        body, token = got
        try:
            ptr = json.loads(body)
            if ptr.get("format") != POINTER_FORMAT or not isinstance(ptr.get("step"), int):
                raise ValueError("unexpected format")
            if _step_of(str(ptr.get("prefix"))) != ptr["step"]:
                raise ValueError("step and prefix disagree")
        except (ValueError, AttributeError) as e:
            return None, token, f"'{LATEST}' is unreadable ({_one_line(str(e), 80)}); ignoring it"
        return ptr, token, None

    def _advance_latest(self, manifest: Manifest, manifest_sha: str) -> bool:
        body = (
            json.dumps(
                {
                    "format": POINTER_FORMAT,
                    "step": manifest.step,
                    "prefix": manifest.prefix,
                    "attempt": manifest.attempt,
                    "manifest_sha256": manifest_sha,
                    "updated": time.time(),
                },
                sort_keys=True,
            )
            + "\n"
        ).encode()
        for _ in range(_CAS_MAX_TRIES):
            ptr, token, _problem = self._read_pointer()
            if ptr is not None:
                if ptr["prefix"] == manifest.prefix:
                    return True  # our own earlier try landed
                if ptr["step"] >= manifest.step:
                    log.warning(
                        "%s: latest names step %d (%s); not moving it to step %d (%s): stale attempt?",
                        self.url,
                        ptr["step"],
                        ptr["prefix"],
                        manifest.step,
                        manifest.prefix,
                    )
                    return False
            if self._backend.put_if(LATEST, body, token):
                return True
            self.cas_conflicts += 1
            log.info("%s: latest changed while moving it to step %d; retrying", self.url, manifest.step)
            time.sleep(_JITTER.uniform(0.005, 0.05))
        raise StoreError(f"could not move latest to step {manifest.step} after {_CAS_MAX_TRIES} conflicts")

    def _prune(self) -> None:
        """Delete checkpoints older than the newest ``keep_last`` valid ones, and junk below them."""
        layout = _layout(self._backend.scan())
        ptr, _, _ = self._read_pointer()
        latest_prefix = ptr["prefix"] if ptr else None
        kept: list[str] = []
        for prefix in sorted(layout.prefixes, key=_order, reverse=True):
            if MANIFEST in layout.prefixes[prefix] and isinstance(self._validate(prefix, layout), Manifest):
                kept.append(prefix)
                if len(kept) == self.keep_last:
                    break
        if len(kept) < self.keep_last:
            return
        floor = _step_of(kept[-1])
        for prefix in sorted(layout.prefixes, key=_order):
            if _step_of(prefix) < floor and prefix != latest_prefix and prefix not in kept:
                self._delete_prefix(prefix, layout.prefixes[prefix])
                log.info("%s: pruned %s", self.url, prefix)

    def _delete_prefix(self, prefix: str, files: dict[str, int]) -> None:
        # Manifest first: a half-deleted checkpoint then reads as uncommitted, never as complete.
        if MANIFEST in files:
            self._backend.delete([f"{prefix}/{MANIFEST}"])
        rest = [f"{prefix}/{n}" for n in files if n != MANIFEST]
        if rest:
            self._backend.delete(rest)

    # -- reading ---------------------------------------------------------------------------------

    def latest(self) -> dict[str, Any] | None:
        """The ``latest`` pointer as stored (step, prefix, attempt, updated), or None."""
        with self._guard():
            return self._read_pointer()[0]

    def list_steps(self) -> list[int]:
        """Steps that have a committed manifest (not validated), ascending."""
        with self._guard():
            layout = _layout(self._backend.scan())
        return sorted({_step_of(p) for p, files in layout.prefixes.items() if MANIFEST in files})

    def delete(self, step: int) -> None:
        """Delete every prefix of ``step`` (all attempts); refuses the one ``latest`` names."""
        with self._guard():
            layout = _layout(self._backend.scan())
            ptr, _, _ = self._read_pointer()
            victims = [p for p in layout.prefixes if _step_of(p) == step]
            if ptr and ptr["prefix"] in victims:
                raise StoreError(f"refusing to delete step {step}: latest names {ptr['prefix']}")
            for p in victims:
                self._delete_prefix(p, layout.prefixes[p])

    def resolve(
        self, expect: dict[str, Any] | None = None, *, verify_checksums: bool = False
    ) -> Manifest | None:
        """The checkpoint to resume from, or None: ``latest`` if it validates, else the newest valid one."""
        return next(self.candidates(expect, verify_checksums=verify_checksums), None)

    def candidates(
        self, expect: dict[str, Any] | None = None, *, verify_checksums: bool = False
    ) -> Iterator[Manifest]:
        """Valid checkpoints to try in order: ``latest`` first, then the others newest step first.

        Validation is lazy (a candidate is checked when reached) and checks that every file is present
        with its manifest size and that ``meta`` matches ``expect``; ``verify_checksums`` also downloads
        and hashes every file. Each skipped candidate costs exactly one warning line.
        """
        with self._guard():
            layout = _layout(self._backend.scan())
            ptr, _, problem = self._read_pointer()
        if layout.foreign:
            shown = ", ".join(layout.foreign[:5]) + (", …" if len(layout.foreign) > 5 else "")
            log.warning("%s: ignoring %d foreign object(s): %s", self.url, len(layout.foreign), shown)
        if problem:
            log.warning("%s: %s", self.url, problem)
        order: list[tuple[str, dict[str, Any] | None]] = [(ptr["prefix"], ptr)] if ptr else []
        order += [(p, None) for p in sorted(layout.prefixes, key=_order, reverse=True)]
        seen: set[str] = set()
        for prefix, via in order:
            if prefix in seen:
                continue
            seen.add(prefix)
            with self._guard():
                result = self._validate(prefix, layout, expect, via, verify_checksums)
            if isinstance(result, Manifest):
                yield result
            else:
                log.warning(
                    "%s: skipping step %d (%s%s): %s",
                    self.url,
                    _step_of(prefix),
                    prefix,
                    ", named by latest" if via else "",
                    result,
                )

    def _validate(
        self,
        prefix: str,
        layout: _Layout,
        expect: dict[str, Any] | None = None,
        ptr: dict[str, Any] | None = None,
        verify_checksums: bool = False,
    ) -> Manifest | str:
        """The manifest if ``prefix`` is a complete checkpoint, else the reason (one line) why not."""
        files = layout.prefixes.get(prefix)
        if not files:
            return "no such checkpoint (its folder is missing or empty)"
        if MANIFEST not in files:
            return "no manifest.json (uncommitted: upload interrupted or still in progress)"
        got = self._backend.get(f"{prefix}/{MANIFEST}")
        if got is None:
            return "manifest.json disappeared while resolving (pruned concurrently?)"
        body = got[0]
        if ptr and ptr.get("manifest_sha256") not in (None, hashlib.sha256(body).hexdigest()):
            return "manifest.json differs from the one latest recorded"
        try:
            m = Manifest.from_json(body)
        except ValueError as e:
            return f"manifest.json is invalid: {e}"
        if m.prefix != prefix or m.step != _step_of(prefix):
            return f"manifest says step {m.step} in {m.prefix}, but it is stored in {prefix}"
        for key, want in (expect or {}).items():
            have = m.meta.get(key, "<absent>")
            if have != want:
                return f"meta {key} is {_short(have)}, expected {_short(want)}"
        for e in m.files:
            size = files.get(e.name)
            if size is None:
                return f"file {e.name} is missing"
            if size != e.size:
                return f"file {e.name} is {size} bytes, manifest says {e.size}"
        if verify_checksums:
            for e in m.files:
                try:
                    self._read_verified(m, e.name)
                except CorruptCheckpoint as err:
                    return err.reason
        return m

    def read(self, manifest: Manifest, name: str) -> bytes:
        """File ``name`` of a committed checkpoint, verified against the manifest's size and sha256."""
        with self._guard():
            return self._read_verified(manifest, name)

    def _read_verified(self, manifest: Manifest, name: str) -> bytes:
        entry = manifest.entry(name)
        data = self._backend.read(f"{manifest.prefix}/{name}")
        if data is None:
            raise CorruptCheckpoint(manifest.step, manifest.prefix, f"file {name} is missing")
        if len(data) != entry.size:
            raise CorruptCheckpoint(
                manifest.step,
                manifest.prefix,
                f"file {name} is {len(data)} bytes, manifest says {entry.size}",
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise CorruptCheckpoint(
                manifest.step,
                manifest.prefix,
                f"file {name} has sha256 {digest[:16]}…, manifest says {entry.sha256[:16]}…",
            )
        return data

    def load_latest(
        self, names: Iterable[str] | None = None, expect: dict[str, Any] | None = None
    ) -> tuple[Manifest, dict[str, bytes]] | None:
        """Read ``names`` (default: all files) from the newest checkpoint whose files all verify.

        A checkpoint that fails (checksum, truncation, a file this rank needs is not in it) is skipped
        with one warning line and the next older one is tried; None when nothing usable exists. With
        several ranks, make them agree on the chosen step (e.g. all-reduce MIN) before using the result.
        """
        wanted = None if names is None else list(names)
        for m in self.candidates(expect):
            want = list(m.names) if wanted is None else wanted
            absent = [n for n in want if n not in m.names]
            if absent:
                log.warning(
                    "%s: skipping step %d (%s): it has no file %s",
                    self.url,
                    m.step,
                    m.prefix,
                    ", ".join(absent),
                )
                continue
            try:
                return m, {n: self.read(m, n) for n in want}
            except CorruptCheckpoint as e:
                log.warning("%s: skipping %s", self.url, e)
        return None

    def read_uncommitted(self, step: int, name: str, wait_s: float = 0.0) -> bytes | None:
        """File ``name`` of this attempt's not-yet-committed ``step`` (waiting up to ``wait_s`` for it).

        For the committing rank to collect what the other ranks wrote (their file entries) without a
        collective, so serializing and uploading can run on background threads.
        """
        if not (isinstance(name, str) and _NAME_RE.match(name)) or name == MANIFEST:
            raise ValueError(f"bad checkpoint file name {name!r}")
        rel = f"{self.prefix(step)}/{name}"
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            with self._guard():
                data = self._backend.read(rel)
            if data is not None or time.monotonic() >= deadline:
                return data
            time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 1.5, 2.0)

    # -- auxiliary objects ---------------------------------------------------------------------------

    def put_aux(self, rel: str, data: bytes) -> None:
        """Overwrite a small auxiliary object (``status.json``, ``metrics/...``) as one whole object.

        Not part of any checkpoint and never pruned; the top-level name must be one of ``AUX_TOP`` so
        that ``resolve`` can tell these objects from foreign ones.
        """
        self._check_aux(rel)
        with self._guard():
            self._backend.put(rel, bytes(data))

    def read_aux(self, rel: str) -> bytes | None:
        """An auxiliary object's bytes, or None if it does not exist."""
        self._check_aux(rel)
        with self._guard():
            return self._backend.read(rel)

    def list_aux(self, sub: str) -> list[str]:
        """Relative paths (usable with ``read_aux``) of the auxiliary objects below folder ``sub``."""
        self._check_aux(sub)
        with self._guard():
            return sorted(k for k in self._backend.scan(sub) if not k.rpartition("/")[2].startswith("."))

    @staticmethod
    def _check_aux(rel: str) -> None:
        if not (isinstance(rel, str) and _AUX_RE.match(rel) and rel.split("/")[0] in AUX_TOP):
            raise ValueError(f"auxiliary path {rel!r} must lie under one of {sorted(AUX_TOP)}")

    def close(self) -> None:
        """Wait for background writes and release resources."""
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        self._backend.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- credentials -----------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for s in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(s, "***")
        return text

    def _leaks(self, e: BaseException) -> bool:
        return any(s in f"{x!s} {x.args!r}" for x in _exc_chain(e) for s in self._secrets)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Re-raise an exception whose text (or cause's) contains a credential as a redacted StoreError."""
        try:
            yield
        except Exception as e:
            if self._secrets and self._leaks(e):
                raise StoreError(self._redact(_one_line(f"{type(e).__name__}: {e}", 500))) from None
            raise

    def _check_meta(self, meta: dict[str, Any]) -> None:
        def walk(obj: Any, path: str) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if _CRED_META_RE.search(str(k)):
                        raise ValueError(f"meta key {path}{k} looks like a credential; refusing to store it")
                    walk(v, f"{path}{k}.")
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    walk(v, path)

        if not isinstance(meta, dict):
            raise TypeError("meta must be a dict")
        walk(meta, "")

    def _check_no_secrets(self, body: bytes) -> None:
        text = body.decode()
        if any(s in text for s in self._secrets):
            raise ValueError("refusing to commit: the manifest would contain a configured credential")


def _split_url(url: str) -> tuple[str, str, tuple[str, str] | None, str]:
    """(protocol, path without protocol, userinfo, display URL with userinfo redacted)."""
    if "://" not in url:
        return "", url, None, url
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo = None
    if "@" in netloc:
        info, netloc = netloc.rsplit("@", 1)
        user, _, password = info.partition(":")
        userinfo = (user, password)
    path = netloc + parts.path
    display = f"{parts.scheme}://{'***@' if userinfo else ''}{path}"
    return parts.scheme.lower(), path, userinfo, display


def _collect_secrets(options: dict[str, Any], userinfo: tuple[str, str] | None) -> frozenset[str]:
    found: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, (dict, list, tuple)):
                    walk(v)
                elif isinstance(v, str) and _CRED_OPTION_RE.search(str(k)):
                    found.add(v)

    walk(options)
    found.update(userinfo or ())
    found.update(os.environ.get(k, "") for k in _CRED_ENV)
    return frozenset(s for s in found if len(s) >= _MIN_SECRET_LEN)


def _s3_options(storage_options: dict[str, Any], userinfo: tuple[str, str] | None) -> dict[str, Any]:
    """s3fs kwargs: endpoint precedence, retry/timeout defaults, URL userinfo as key/secret."""
    opts = dict(storage_options)
    if userinfo:
        opts.setdefault("key", userinfo[0])
        if userinfo[1]:
            opts.setdefault("secret", userinfo[1])
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    endpoint = (
        opts.pop("endpoint_url", None)
        or client_kwargs.get("endpoint_url")
        or os.environ.get("PIXPRO_S3_ENDPOINT")
    )
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    opts["client_kwargs"] = client_kwargs
    config = {**_S3_CONFIG_DEFAULTS, **(opts.pop("config_kwargs", None) or {})}
    if config.get("retries") not in (None, _NO_BOTOCORE_RETRIES):
        log.warning(
            "config_kwargs.retries is ignored: the store retries itself (botocore's jitter would "
            "draw from the trainer's random stream)"
        )
    opts["config_kwargs"] = {**config, "retries": dict(_NO_BOTOCORE_RETRIES)}
    return opts
