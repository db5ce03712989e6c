"""CheckpointStore against a real S3 endpoint (moto server over HTTP on 127.0.0.1), with injected faults."""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from typing import Any

import pytest

from launch.store import CheckpointStore, CorruptCheckpoint, Manifest, StoreError, StoreUnavailable

# The fixtures (moto_s3, s3_url, raw_s3, fault_proxy, s3fs_fresh) come from tests/conftest.py's plugin:
# importing them here too would register a second session server sharing moto's in-process backend.
from tests.conftest_s3 import FAKE_KEY_ID, FAKE_SECRET, MotoS3, s3_storage_options
from tests.faultproxy import FaultProxy

LOGGER = "launch.store"
pytestmark = pytest.mark.timeout(180)


def payload(step: int, rank: int, size: int = 4096) -> bytes:
    return (f"step={step} rank={rank};".encode() * size)[:size]


def save(store: CheckpointStore, step: int, world: int = 2, size: int = 4096, **meta: Any) -> Manifest:
    entries = [store.write(step, f"rank{r}.pt", payload(step, r, size)) for r in range(world)]
    return store.commit(step, entries, {"world_size": world, "spec_hash": "abc", **meta}, wait_s=10)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def key(url: str, rel: str) -> str:
    return f"{url.removeprefix('s3://')}/{rel}"


def direct(url: str, moto: MotoS3, **kw: Any) -> CheckpointStore:
    return CheckpointStore(url, s3_storage_options(moto.endpoint), **kw)


def via(url: str, proxy: FaultProxy, **kw: Any) -> CheckpointStore:
    return CheckpointStore(url, s3_storage_options(proxy.url), timeout_s=kw.pop("timeout_s", 5.0), **kw)


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_latest_moves_and_pruning(s3_url: str, moto_s3: MotoS3, raw_s3: Any) -> None:
    store = direct(s3_url, moto_s3, keep_last=2, attempt="j7")
    m1 = save(store, 100)
    assert store.resolve() == m1 and store.read(m1, "rank1.pt") == payload(100, 1)
    ptr = json.loads(raw_s3.cat_file(key(s3_url, "latest")))
    assert ptr["step"] == 100 and ptr["prefix"] == "step-000000000100.j7"
    m2 = save(store, 200)
    assert store.latest()["step"] == 200 and store.resolve() == m2
    for step in (300, 400):
        save(store, step)
    assert store.list_steps() == [300, 400]
    assert sorted(p.rsplit("/", 1)[-1] for p in raw_s3.ls(s3_url)) == [
        "latest",
        "step-000000000300.j7",
        "step-000000000400.j7",
    ]
    loaded = store.load_latest(["rank0.pt"])
    assert loaded is not None and loaded[0].step == 400 and loaded[1]["rank0.pt"] == payload(400, 0)


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
    store = via(s3_url, fault_proxy, timeout_s=2.0)
    good = save(store, 1)
    e0 = store.write(2, "rank0.pt", payload(2, 0, 1_000_000))
    fault_proxy.stall()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="deadline"):
        store.write(2, "rank1.pt", payload(2, 1, 1_000_000))
    assert time.monotonic() - t0 < 30
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


def test_exception_mid_write(s3_url: str, moto_s3: MotoS3, raw_s3: Any) -> None:
    store = direct(s3_url, moto_s3)
    good = save(store, 10)

    def serializer_that_dies(f: Any) -> None:
        f.write(b"x" * 100_000)
        raise RuntimeError("torch.save blew up")

    with pytest.raises(RuntimeError):
        store.write(20, "rank0.pt", serializer_that_dies)
    assert not raw_s3.exists(key(s3_url, "step-000000000020.0/rank0.pt"))
    assert store.resolve() == good

    # Why write() never streams through fs.open: on s3fs an exception inside the with-block still
    # completes the upload, so a partial object becomes visible under the final name.
    naive = key(s3_url, "naive/rank0.pt")
    with pytest.raises(RuntimeError), raw_s3.open(naive, "wb") as f:
        f.write(b"x" * 100_000)
        raise RuntimeError("torch.save blew up")
    assert raw_s3.info(naive)["size"] == 100_000


# -- corruption -----------------------------------------------------------------------------------


def test_truncated_file_in_newest_step(
    s3_url: str, moto_s3: MotoS3, raw_s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = direct(s3_url, moto_s3)
    good = save(store, 1100)
    bad = save(store, 1200)
    raw_s3.pipe_file(key(s3_url, f"{bad.prefix}/rank0.pt"), payload(1200, 0)[:100])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == good
    (line,) = warnings_of(caplog)
    assert "skipping step 1200" in line and "file rank0.pt is 100 bytes, manifest says 4096" in line


def test_wrong_checksum(s3_url: str, moto_s3: MotoS3, raw_s3: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = direct(s3_url, moto_s3)
    good = save(store, 1100)
    bad = save(store, 1200)
    path = key(s3_url, f"{bad.prefix}/rank1.pt")
    raw_s3.pipe_file(path, b"Z" + raw_s3.cat_file(path)[1:])
    assert store.resolve() == bad
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        store.read(bad, "rank1.pt")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = store.load_latest()
    assert loaded is not None and loaded[0] == good
    (line,) = warnings_of(caplog)
    assert "skipping step 1200" in line and "rank1.pt has sha256" in line


def test_latest_naming_missing_step(
    s3_url: str, moto_s3: MotoS3, raw_s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = direct(s3_url, moto_s3)
    good = save(store, 1100)
    bad = save(store, 1200)
    raw_s3.rm(key(s3_url, bad.prefix), recursive=True)
    raw_s3.pipe_file(key(s3_url, "unrelated.bin"), b"not ours")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == good
    lines = warnings_of(caplog)
    assert len(lines) == 2
    assert "1 foreign object(s): unrelated.bin" in lines[0]
    assert "skipping step 1200" in lines[1] and "named by latest" in lines[1] and "missing" in lines[1]


# -- fencing and compare-and-swap -----------------------------------------------------------------


def test_fencing_stale_attempt(s3_url: str, moto_s3: MotoS3, caplog: pytest.LogCaptureFixture) -> None:
    stale = direct(s3_url, moto_s3, attempt="job1-0")
    new = direct(s3_url, moto_s3, attempt="job1-1")
    entries = [stale.write(500, f"rank{r}.pt", payload(500, r)) for r in range(2)]
    newer = save(new, 800)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stale.commit(500, entries, {"world_size": 2})
    assert new.latest()["prefix"] == newer.prefix and new.resolve() == newer
    assert any("not moving it to step 500" in w for w in warnings_of(caplog))


def test_conditional_writes_are_real(s3_url: str, moto_s3: MotoS3) -> None:
    backend = direct(s3_url, moto_s3)._backend
    assert backend.put_if("x", b"1", None)
    assert not backend.put_if("x", b"2", None)  # If-None-Match: * -> 412
    _, etag = backend.get("x")
    assert backend.put_if("x", b"3", etag)
    assert not backend.put_if("x", b"4", etag)  # stale If-Match -> 412
    assert backend.get("x")[0] == b"3"


class _Interleaved:
    """Wraps a backend so that another writer commits right after this one read ``latest``."""

    def __init__(self, inner: Any, meddle: Any) -> None:
        self.inner, self.meddle, self.kind = inner, meddle, inner.kind

    def get(self, rel: str) -> Any:
        got = self.inner.get(rel)
        if rel == "latest" and self.meddle is not None:
            meddle, self.meddle = self.meddle, None
            meddle()
        return got

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


def test_cas_race_threads(s3_url: str, moto_s3: MotoS3) -> None:
    errors: list[BaseException] = []
    observed: list[int] = []
    stop = threading.Event()

    def writer(k: int) -> None:
        try:
            store = direct(s3_url, moto_s3, attempt=f"w{k}", keep_last=100)
            for step in range(k, 24, 4):
                store.commit(step, [store.write(step, "rank0.pt", payload(step, 0, 64))], {})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def watcher() -> None:
        store = direct(s3_url, moto_s3)
        while not stop.is_set():
            ptr = store.latest()
            if ptr:
                observed.append(ptr["step"])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    w = threading.Thread(target=watcher)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    assert not errors, errors
    final = direct(s3_url, moto_s3)
    assert final.latest()["step"] == 23 and final.list_steps() == list(range(24))
    assert observed == sorted(observed), "latest went backwards"


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
        with pytest.raises(StoreError) as leaked, via_url._guard():
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
def test_throughput_100mb(s3_url: str, moto_s3: MotoS3, raw_s3: Any, record_property: Any) -> None:
    """Median of 3 rounds (the machine is shared); raw s3fs in the same run shows the store's overhead."""
    store = direct(s3_url, moto_s3, keep_last=1)
    data = os.urandom(100 * 2**20)
    mib = len(data) / 2**20
    times: dict[str, list[float]] = {"write": [], "commit": [], "read": [], "raw_put": [], "raw_cat": []}
    for step in range(3):
        t0 = time.perf_counter()
        entry = store.write(step, "rank0.pt", data)  # multipart (2 x 50 MiB), sha256, HEAD size check
        t1 = time.perf_counter()
        m = store.commit(step, [entry], {})
        t2 = time.perf_counter()
        assert store.read(m, "rank0.pt") == data  # concurrent ranged GETs, size + sha256 check
        t3 = time.perf_counter()
        raw_s3.pipe_file(key(s3_url, "raw.bin"), data)
        t4 = time.perf_counter()
        raw_s3.cat_file(key(s3_url, "raw.bin"))
        t5 = time.perf_counter()
        for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        record_property(f"{k}_s", round(v, 3))
    print(
        f"\n100 MiB checkpoint to moto (median of 3): store write {mib / med['write']:.0f} MiB/s,"
        f" commit {med['commit'] * 1000:.0f} ms, store read+verify {mib / med['read']:.0f} MiB/s;"
        f" raw s3fs put {mib / med['raw_put']:.0f} MiB/s, cat {mib / med['raw_cat']:.0f} MiB/s"
    )
    assert store.list_steps() == [2]
    assert mib / med["write"] > 1 and mib / med["read"] > 1


def test_aux_objects(s3_url: str, moto_s3: MotoS3, caplog: pytest.LogCaptureFixture) -> None:
    store = direct(s3_url, moto_s3)
    store.put_aux("status.json", b"{}")
    store.put_aux("metrics/a.000000.jsonl", b"1\n")
    store.put_aux("metrics/a.000001.jsonl", b"2\n")
    m = save(store, 1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == m
    assert warnings_of(caplog) == []
    assert store.list_aux("metrics") == ["metrics/a.000000.jsonl", "metrics/a.000001.jsonl"]
    assert store.read_aux("metrics/a.000001.jsonl") == b"2\n" and store.read_aux("run.json") is None


def test_empty_store_and_missing_bucket(s3_url: str, moto_s3: MotoS3) -> None:
    assert direct(s3_url, moto_s3).resolve() is None
    with pytest.raises(FileNotFoundError):
        direct("s3://no-such-bucket-pixpro/run", moto_s3).resolve()
