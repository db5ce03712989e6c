"""Pytest fixtures for a real S3 endpoint on loopback: a moto server, a bucket, and a fault proxy.

Load as a plugin (``pytest_plugins = ["tests.conftest_s3"]`` when the repository root is importable) or
import the fixtures by name. Nothing here mocks S3: s3fs talks HTTP to ``moto.server.ThreadedMotoServer``
on 127.0.0.1, optionally through :class:`FaultProxy` so tests can cut, slow or stall the connection.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.procs import free_port

try:
    from tests.faultproxy import FaultProxy
except ImportError:  # tests/ itself is on sys.path (pytest's default rootdir-less import mode)
    from faultproxy import FaultProxy

# Fake credentials: distinctive so tests can grep logs and files for them.
FAKE_KEY_ID = "PIXPROFAKEKEYID0001"
FAKE_SECRET = "pixpro-fake-secret-do-not-log-0001"
BUCKET = "pixpro-test-ckpt"


@dataclass(frozen=True)
class MotoS3:
    """Where the session's moto server listens."""

    host: str
    port: int
    bucket: str

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"


def s3_storage_options(endpoint: str, **config: Any) -> dict[str, Any]:
    """storage_options for tests: short timeouts and few retries so fault tests finish in seconds."""
    cfg: dict[str, Any] = {"connect_timeout": 2, "read_timeout": 3}
    cfg.update(config)
    return {"client_kwargs": {"endpoint_url": endpoint}, "config_kwargs": cfg}


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """One moto server per session (per xdist worker) with fake AWS_* credentials and one bucket."""
    with moto_server() as server:
        yield server


@contextmanager
def moto_server() -> Iterator[MotoS3]:
    """A moto server on a free loopback port with fake AWS_* credentials in the environment and one
    bucket, for the fixture above and for benches."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for var in (
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "PIXPRO_S3_ENDPOINT",
            "AWS_SESSION_TOKEN",
        ):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/pixpro-test-aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/pixpro-test-aws-credentials")
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            import s3fs

            fs = s3fs.S3FileSystem(
                client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"}, skip_instance_cache=True
            )
            if not fs.exists(BUCKET):  # moto's backend is per process: a second server sees the bucket
                fs.mkdir(BUCKET)
            yield MotoS3("127.0.0.1", port, BUCKET)
        finally:
            server.stop()


@pytest.fixture
def s3fs_fresh() -> Iterator[None]:
    """Drop cached S3FileSystem instances so no test sees another test's endpoint or credentials."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_url(moto_s3: MotoS3, s3fs_fresh: None) -> str:
    """A fresh, empty store URL in the session bucket."""
    return f"s3://{moto_s3.bucket}/run-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw_s3(moto_s3: MotoS3, s3fs_fresh: None) -> Any:
    """A plain s3fs filesystem straight to moto, for tampering with objects behind the store's back."""
    import s3fs

    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": moto_s3.endpoint}, skip_instance_cache=True, use_listings_cache=False
    )


@pytest.fixture
def fault_proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of moto, passthrough at start, stopped after the test."""
    with FaultProxy((moto_s3.host, moto_s3.port), lifetime_s=600) as proxy:
        yield proxy
