"""What only S3 has (moto server over HTTP on 127.0.0.1): injected transport faults, the endpoint rule,
real conditional writes, credentials. The protocol suite runs on S3 too, in test_store.py."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest

from launch.store import CheckpointStore, StoreError, StoreUnavailable

# The fixtures (moto_s3, s3_url, raw_s3, fault_proxy, s3fs_fresh) come from tests/conftest.py's plugin:
# importing them here too would register a second session server sharing moto's in-process backend.
from tests.conftest_s3 import FAKE_KEY_ID, FAKE_SECRET, MotoS3, s3_storage_options
from tests.faultproxy import FaultProxy
from tests.support.store import committed_steps, payload, save

LOGGER = "launch.store"
pytestmark = pytest.mark.timeout(180)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def key(url: str, rel: str) -> str:
    return f"{url.removeprefix('s3://')}/{rel}"


def direct(url: str, moto: MotoS3, **kw: Any) -> CheckpointStore:
    return CheckpointStore(url, s3_storage_options(moto.endpoint), **kw)


def via(url: str, proxy: FaultProxy, **kw: Any) -> CheckpointStore:
    return CheckpointStore(url, s3_storage_options(proxy.url), timeout_s=kw.pop("timeout_s", 5.0), **kw)


def test_endpoint_from_environment(s3_url: str, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXPRO_S3_ENDPOINT", moto_s3.endpoint)
    m = save(CheckpointStore(s3_url), 1)
    monkeypatch.delenv("PIXPRO_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.endpoint)  # botocore's own variable
    assert CheckpointStore(s3_url).resolve() == m


# -- faults during upload ---------------------------------------------------------------------------


def test_transient_reset_mid_upload_is_retried(s3_url: str, fault_proxy: FaultProxy) -> None:
    store = via(s3_url, fault_proxy)
    save(store, 1)
    fault_proxy.reset_after(300_000, once=True)
    m = save(store, 2, size=2_000_000)
    assert fault_proxy.stats.resets == 1
    assert store.read(m, "rank0.pt") == payload(2, 0, 2_000_000)


def test_outage_mid_upload_keeps_previous_checkpoint(
    s3_url: str, fault_proxy: FaultProxy, moto_s3: MotoS3, caplog: pytest.LogCaptureFixture
) -> None:
    store = via(s3_url, fault_proxy)
    good = save(store, 1000)
    e0 = store.write(1100, "rank0.pt", payload(1100, 0, 2_000_000))
    fault_proxy.reset_after(500_000, once=False)  # rank 1's upload dies half way, and so does every retry
    with pytest.raises(StoreUnavailable):
        store.write(1100, "rank1.pt", payload(1100, 1, 2_000_000))
    assert fault_proxy.stats.resets >= 2
    fault_proxy.passthrough()

    observer = direct(s3_url, moto_s3)
    assert observer.latest()["step"] == 1000
    assert observer.resolve() == good  # no manifest for 1100: not even considered after latest
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert list(observer.candidates()) == [good]
    assert any("skipping step 1100" in w and "no manifest.json" in w for w in warnings_of(caplog))

    e1 = store.write(1100, "rank1.pt", payload(1100, 1, 2_000_000))  # the fault cleared: retry succeeds
    m = store.commit(1100, [e0, e1], {"world_size": 2})
    assert observer.resolve() == m and observer.read(m, "rank1.pt") == payload(1100, 1, 2_000_000)


def test_stalled_server_times_out_instead_of_hanging(s3_url: str, fault_proxy: FaultProxy) -> None:
    store = via(s3_url, fault_proxy, timeout_s=10.0)  # room for the calls around the stall on a busy machine
    good = save(store, 1)
    e0 = store.write(2, "rank0.pt", payload(2, 0, 1_000_000))
    fault_proxy.stall()
    with pytest.raises(StoreUnavailable, match="deadline"):  # how soon: benches/bench_deadlines.py
        store.write(2, "rank1.pt", payload(2, 1, 1_000_000))
    fault_proxy.passthrough()
    assert store.resolve() == good
    m = store.commit(2, [e0, store.write(2, "rank1.pt", payload(2, 1, 1_000_000))], {})
    assert store.resolve() == m


def test_latency_does_not_break_commit(s3_url: str, fault_proxy: FaultProxy) -> None:
    store = via(s3_url, fault_proxy)
    fault_proxy.latency(0.02)
    m = save(store, 5)
    fault_proxy.passthrough()
    assert store.resolve() == m


def test_conditional_writes_are_real(s3_url: str, moto_s3: MotoS3) -> None:
    backend = direct(s3_url, moto_s3)._backend
    assert backend.put_if("x", b"1", None)
    assert not backend.put_if("x", b"2", None)  # If-None-Match: * -> 412
    _, etag = backend.get("x")
    assert backend.put_if("x", b"3", etag)
    assert not backend.put_if("x", b"4", etag)  # stale If-Match -> 412
    assert backend.get("x")[0] == b"3"


class _Interleaved:
    """Wraps a backend so that another writer commits after this one read ``latest`` to move it, before
    its conditional write."""

    def __init__(self, inner: Any, meddle: Any) -> None:
        self.inner, self.meddle, self.kind = inner, meddle, inner.kind

    def put_if(self, rel: str, data: bytes, token: Any) -> bool:
        if rel == "latest" and self.meddle is not None:
            meddle, self.meddle = self.meddle, None
            meddle()
        return self.inner.put_if(rel, data, token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_cas_conflict_is_retried(s3_url: str, moto_s3: MotoS3, caplog: pytest.LogCaptureFixture) -> None:
    a = direct(s3_url, moto_s3, attempt="a", keep_last=10)
    b = direct(s3_url, moto_s3, attempt="b", keep_last=10)
    save(a, 1)
    a._backend = _Interleaved(a._backend, lambda: save(b, 2))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        mine = save(a, 3)  # reads latest=1, b moves it to 2, a's If-Match gets a real 412, a re-reads, wins
    assert a.cas_conflicts == 1
    assert any("latest changed while moving it to step 3" in r.getMessage() for r in caplog.records)
    assert b.latest()["prefix"] == mine.prefix

    a._backend = _Interleaved(a._backend.inner, lambda: save(b, 9))
    save(a, 4)  # the conflict reveals a newer step: fenced, latest stays at 9
    assert a.cas_conflicts == 2 and b.latest()["step"] == 9


# -- credentials ----------------------------------------------------------------------------------


def test_credentials_never_leak(
    s3_url: str,
    moto_s3: MotoS3,
    raw_s3: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret_id, secret = "AKIAPIXPROOPTIONKEY9", "opt-secret-value-must-not-appear-42"
    opts = {**s3_storage_options(moto_s3.endpoint), "key": secret_id, "secret": secret}
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        store = CheckpointStore(s3_url, opts, keep_last=2)
        save(store, 1)
        bad = save(store, 2)
        raw_s3.pipe_file(key(s3_url, f"{bad.prefix}/rank0.pt"), b"short")
        store.resolve()
        with pytest.raises(ValueError) as info:
            store.commit(3, [store.write(3, "rank0.pt", b"x")], {"note": f"oops {secret}"})
        assert secret not in str(info.value)
        userinfo_url = s3_url.replace("s3://", f"s3://{secret_id}:{secret}@")
        via_url = CheckpointStore(userinfo_url, s3_storage_options(moto_s3.endpoint))
        assert via_url.resolve().step == 1
        assert secret not in repr(via_url) and secret_id not in via_url.url
        # an error text that contains the secret is re-raised redacted
        with pytest.raises(StoreError) as leaked, via_url._redactor.guard():
            raise OSError(f"connection to https://{secret_id}:{secret}@example failed")
        assert secret not in str(leaked.value) and "***" in str(leaked.value)
    text = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert caplog.records and secret not in text and secret_id not in text
    for path in raw_s3.find(s3_url):
        body = raw_s3.cat_file(path)
        assert secret.encode() not in body and secret_id.encode() not in body, path
    assert FAKE_SECRET not in text and FAKE_KEY_ID not in text


# -- throughput -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_100mb_checkpoint_round_trips_in_parts(s3_url: str, moto_s3: MotoS3) -> None:
    """Multipart write (2 x 50 MiB), commit, concurrent ranged reads, twice with keep_last 1. How fast:
    benches/bench_s3.py (raw s3fs beside it shows the store's overhead)."""
    store = direct(s3_url, moto_s3, keep_last=1)
    data = os.urandom(100 * 2**20)
    for step in range(2):
        m = store.commit(step, [store.write(step, "rank0.pt", data)], {})
        assert store.read(m, "rank0.pt") == data  # size + sha256 checked
    assert committed_steps(store) == [1]


def test_empty_store_and_missing_bucket(s3_url: str, moto_s3: MotoS3) -> None:
    assert direct(s3_url, moto_s3).resolve() is None
    with pytest.raises(FileNotFoundError):
        direct("s3://no-such-bucket-pixpro/run", moto_s3).resolve()
