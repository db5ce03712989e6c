"""S3 through s3fs: real conditional writes, a wall-clock deadline per call, retries without jitter.

The endpoint is, first match wins: ``storage_options["endpoint_url"]`` or
``storage_options["client_kwargs"]["endpoint_url"]``, then ``PIXPRO_S3_ENDPOINT``, then botocore's own
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``. Retries: botocore makes one attempt per call, since it
draws its retry jitter from the process-wide ``random`` module on whichever thread uploads, which would
shift the trainer's saved Python RNG stream with network weather; s3fs's own loop retries instead (5
tries, fixed back-off) on transport errors, throttling and 5xx answers.

A stalled connection (accepted, never answered) is abandoned within seconds: connect timeout 5 s, read
timeout 10 s, and no ``Expect: 100-continue`` (botocore adds it to uploads, and aiohttp applies no read
timeout while it waits for ``100 Continue``: a stalled PUT then hung until the call's deadline, 136 s
measured, long after the store answered again). The header is dropped after signing (SigV4 never signs
it). Every call also has a wall-clock deadline (``timeout_s`` + 1 s per MiB of body): aiohttp has no write
timeout, so a body stuck in a full send buffer is bounded by that alone.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from launch.store.backends import exc_chain, failure_cause, is_precondition_failure
from launch.store.format import StoreError, StoreUnavailable, one_line
from schemas.contract import S3_ENDPOINT_ENV

log = logging.getLogger("launch.store")

S3_CONFIG_DEFAULTS: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 10}
NO_BOTOCORE_RETRIES = {"total_max_attempts": 1, "mode": "standard"}  # its jitter uses the global random
S3FS_RETRIES = 5  # s3fs's loop: fixed back-off 0.1 s x 1.7^i, no randomness
MIN_BYTES_PER_S = 2**20  # the per-operation deadline grants 1 s per MiB on top of timeout_s
PART_BYTES = 8 * 2**20  # a streamed upload holds one part in memory (S3's minimum is 5 MiB); a stalled
# part is abandoned after timeout_s + 8 s


async def _bounded(coro: Any, timeout: float, hook: Any = None) -> Any:
    import asyncio

    async def run() -> Any:
        try:
            if hook is not None:
                await hook
            return await coro
        finally:
            coro.close()  # unawaited when the hook failed: no "never awaited" warning
            if hook is not None:
                hook.close()

    return await asyncio.wait_for(run(), timeout)


def _drop_expect(request: Any, **_: Any) -> None:
    """``before-send``: no ``Expect: 100-continue``, so the read timeout bounds an upload's answer."""
    if "Expect" in request.headers:
        del request.headers["Expect"]


async def _hook_client(fs: Any) -> None:
    client = await fs.set_session()
    client.meta.events.register("before-send.s3", _drop_expect, unique_id="pixpro-drop-expect")


class S3Backend:
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
        self.fs.retries = S3FS_RETRIES
        s3fs.core.set_custom_error_handler(is_transient)  # what botocore's retries would have covered
        self.timeout_s = timeout_s
        self._hooked = False
        self.bucket, _, self.key_root = root.strip("/").partition("/")
        self.key_root = self.key_root.strip("/")
        if not self.bucket:
            raise ValueError("an s3:// URL needs a bucket")

    def _key(self, rel: str) -> str:
        return f"{self.key_root}/{rel}" if self.key_root else rel

    def _run(self, coro: Any, what: str, nbytes: int = 0) -> Any:
        from fsspec.asyn import sync

        deadline = self.timeout_s + nbytes / MIN_BYTES_PER_S
        try:
            hook = None if self._hooked else _hook_client(self.fs)
            got = sync(self.fs.loop, _bounded, coro, deadline, hook)
            self._hooked = True
            return got
        except (FileNotFoundError, FileExistsError, PermissionError):
            raise
        except Exception as e:
            if is_transport_error(e):
                cfg = self.fs.config_kwargs or {}
                cause = failure_cause(
                    e,
                    connect_s=cfg.get("connect_timeout"),
                    read_s=cfg.get("read_timeout"),
                    deadline_s=deadline,
                )
                raise StoreUnavailable(one_line(f"S3 {what} failed: {cause}")) from e
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

    def open_sink(self, rel: str) -> MultipartSink:
        return MultipartSink(self, rel)

    def put_if(self, rel: str, data: bytes, token: str | None) -> bool:
        cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        coro = self.fs._call_s3("put_object", Bucket=self.bucket, Key=self._key(rel), Body=data, **cond)
        try:
            self._run(coro, f"conditional write of {rel}", len(data))
        except FileNotFoundError:  # If-Match on a key deleted meanwhile
            return False
        except Exception as e:
            if is_precondition_failure(e):
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
                if tries_left == 0 or not is_transport_error(e):
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


class MultipartSink:
    """A streamed upload holding one part in memory: a single PUT if it all fits in one part, else a
    multipart upload completed at ``finish`` (the object appears whole) and aborted on any error."""

    def __init__(self, backend: S3Backend, rel: str) -> None:
        self.b, self.rel, self.key = backend, rel, backend._key(rel)
        self.buf = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.upload_id: str | None = None
        self.size = 0

    def _call(self, op: str, nbytes: int = 0, **kw: Any) -> Any:
        coro = self.b.fs._call_s3(op, Bucket=self.b.bucket, Key=self.key, **kw)
        return self.b._run(coro, f"{op} of {self.rel}", nbytes)

    def write(self, chunk: memoryview) -> None:
        self.buf += chunk
        self.size += len(chunk)
        if len(self.buf) >= PART_BYTES:
            self._flush_part()

    def _flush_part(self) -> None:
        if self.upload_id is None:
            self.upload_id = self._call("create_multipart_upload")["UploadId"]
        n = len(self.parts) + 1
        body = bytes(self.buf)
        self.buf = bytearray()
        got = self._call("upload_part", len(body), UploadId=self.upload_id, PartNumber=n, Body=body)
        self.parts.append({"PartNumber": n, "ETag": got["ETag"]})

    def finish(self) -> None:
        try:
            if self.upload_id is None:
                self._call("put_object", self.size, Body=bytes(self.buf))
            else:
                if self.buf:
                    self._flush_part()
                self._call(
                    "complete_multipart_upload",
                    self.size,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": self.parts},
                )
                self.upload_id = None
            size = int(self._call("head_object")["ContentLength"])
        except BaseException:
            self.abort()
            raise
        if size != self.size:
            raise StoreError(f"{self.rel}: wrote {self.size} bytes but the store holds {size}")

    def abort(self) -> None:
        self.buf = bytearray()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            try:
                self._call("abort_multipart_upload", UploadId=upload_id)
            except Exception as e:  # an orphaned upload holds no visible object; S3 lifecycle rules reap it
                log.warning("%s: aborting the multipart upload failed: %s", self.rel, one_line(str(e), 120))


def is_transport_error(e: BaseException) -> bool:
    """Connection refused/reset, timeouts, truncated bodies: worth a retry, not a sign of corruption."""
    import aiohttp
    import botocore.exceptions as bex

    kinds = (bex.ConnectionError, bex.HTTPClientError, aiohttp.ClientError, TimeoutError, ConnectionError)
    return any(isinstance(x, kinds) for x in exc_chain(e))


def is_transient(e: BaseException) -> bool:
    """Worth another try in s3fs's retry loop: transport errors, throttling, 5xx answers."""
    import botocore.exceptions as bex

    if is_transport_error(e):
        return True
    if isinstance(e, bex.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(e.response.get("Error", {}).get("Code", ""))
        return status >= 500 or code in ("Throttling", "ThrottlingException", "RequestTimeout", "SlowDown")
    return False


def s3_options(storage_options: dict[str, Any], userinfo: tuple[str, str] | None) -> dict[str, Any]:
    """s3fs kwargs: endpoint precedence, retry/timeout defaults, URL userinfo as key/secret."""
    opts = dict(storage_options)
    if userinfo:
        opts.setdefault("key", userinfo[0])
        if userinfo[1]:
            opts.setdefault("secret", userinfo[1])
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    endpoint = (
        opts.pop("endpoint_url", None) or client_kwargs.get("endpoint_url") or os.environ.get(S3_ENDPOINT_ENV)
    )
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    opts["client_kwargs"] = client_kwargs
    config = {**S3_CONFIG_DEFAULTS, **(opts.pop("config_kwargs", None) or {})}
    if config.get("retries") not in (None, NO_BOTOCORE_RETRIES):
        log.warning(
            "config_kwargs.retries is ignored: the store retries itself (botocore's jitter would "
            "draw from the trainer's random stream)"
        )
    opts["config_kwargs"] = {**config, "retries": dict(NO_BOTOCORE_RETRIES)}
    return opts
