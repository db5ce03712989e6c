"""The checkpoint store's protocol, run against a local folder and against S3 (moto over HTTP): commit,
corruption handling, fencing, compare-and-swap races, auxiliary objects. S3-only behaviour (faults,
endpoint rule, real conditional writes, credentials) is in test_store_s3.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.progress import read_progress
from launch.store import (
    MANIFEST,
    CheckpointExists,
    CheckpointStore,
    CommitTimeout,
    CorruptCheckpoint,
    FileEntry,
    StoreUnavailable,
    Superseded,
)
from schemas.contract import METRICS_DIR
from tests.conftest_s3 import s3_storage_options
from tests.support.store import Target, committed_steps, payload, save

LOGGER = "launch.store"
pytestmark = pytest.mark.timeout(180)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "local":
        yield Target("local", str(tmp_path / "store"), {}, root=tmp_path / "store")
        return
    import s3fs

    moto = request.getfixturevalue("moto_s3")
    request.getfixturevalue("s3fs_fresh")
    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": moto.endpoint}, skip_instance_cache=True, use_listings_cache=False
    )
    url = f"s3://{moto.bucket}/run-{uuid.uuid4().hex[:12]}"
    yield Target("s3", url, s3_storage_options(moto.endpoint), fs=fs)


# -- round trip --------------------------------------------------------------------------------------


def test_round_trip_and_layout(target: Target) -> None:
    store = target.store(attempt="j1")
    m = save(store, 1234)
    assert m.prefix == "step-000000001234.j1"
    assert target.top() == ["latest", m.prefix]
    doc = json.loads(target.read(f"{m.prefix}/{MANIFEST}"))
    assert doc["step"] == 1234 and doc["attempt"] == "j1" and doc["meta"]["world_size"] == 2
    assert [f["name"] for f in doc["files"]] == ["rank0.pt", "rank1.pt"]
    assert target.latest()["step"] == 1234 and target.latest()["prefix"] == m.prefix

    got = store.resolve()
    assert got == m
    assert store.read(got, "rank1.pt") == payload(1234, 1)
    loaded = store.load_latest(["rank0.pt"])
    assert loaded is not None and loaded[1] == {"rank0.pt": payload(1234, 0)}
    assert committed_steps(store) == [1234]


def test_empty_store_resolves_to_none(target: Target) -> None:
    store = target.store()
    assert store.resolve() is None and store.load_latest() is None and store.latest() is None


def test_latest_moves_and_keep_last_prunes(target: Target) -> None:
    store = target.store(keep_last=2)
    for step in (100, 200):
        save(store, step)
        assert store.latest()["step"] == step
    # junk from a crashed older attempt, below everything kept: pruned too
    target.store(attempt="crashed").write(150, "rank0.pt", b"partial")
    for step in (300, 400):
        save(store, step)
    assert committed_steps(store) == [300, 400]
    assert target.top() == ["latest", "step-000000000300.0", "step-000000000400.0"]
    assert store.resolve().step == 400


def test_write_refuses_a_committed_prefix(target: Target) -> None:
    store = target.store()
    save(store, 5)
    with pytest.raises(CheckpointExists):
        store.write(5, "rank0.pt", b"again")
    save(target.store(attempt="1"), 5)  # a new attempt writes the same step into its own prefix


def test_a_commit_retried_after_its_manifest_landed_moves_latest(target: Target) -> None:
    """The manifest's PUT landed but its answer was lost (a deadline, a reset), so the uploader calls
    commit() again, with a manifest that differs only in ``created``: it is this commit's own, so the
    commit goes on and moves ``latest``. A manifest that commits something else is still refused."""
    store = target.store()
    save(store, 100)
    entries = [store.write(200, f"rank{r}.pt", payload(200, r)) for r in range(2)]
    meta = {"world_size": 2, "spec_hash": "abc"}
    put_if = store._backend.put_if

    def answer_lost(rel: str, data: bytes, token: str | None) -> bool:
        landed = put_if(rel, data, token)
        if rel.endswith(MANIFEST):
            store._backend.put_if = put_if  # type: ignore[method-assign]
            raise StoreUnavailable(f"PUT {rel}: the connection was reset")
        return landed

    store._backend.put_if = answer_lost  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        store.commit(200, entries, meta)
    assert store.latest()["step"] == 100  # committed, not yet pointed at
    m = store.commit(200, entries, meta)
    assert store.latest()["step"] == 200 and store.resolve() == m
    with pytest.raises(CheckpointExists):
        store.commit(200, entries, {**meta, "world_size": 3})
    assert store.resolve() == m


def test_a_reader_looks_again_when_the_trainer_commits_and_prunes_under_it(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """export or eval beside a training run (``keep_last=1``): the trainer commits and prunes right after
    the reader listed the store, so nothing the reader listed exists any more; ``latest`` has moved, so
    it looks again and finds the new checkpoint instead of none."""
    trainer = target.store(keep_last=1)
    save(trainer, 100)
    reader = target.store(attempt="reader")
    scan = reader._backend.scan
    moved = []

    def the_trainer_commits_after_the_listing(sub: str = "") -> dict[str, int]:
        listed = scan(sub)
        if not sub and not moved:
            moved.append(save(trainer, 200))
        return listed

    reader._backend.scan = the_trainer_commits_after_the_listing  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = reader.load_latest(["rank0.pt"])
    assert moved and committed_steps(trainer) == [200]
    assert loaded is not None and loaded[0] == moved[0] and loaded[1] == {"rank0.pt": payload(200, 0)}
    assert any("latest moved to step 200 while resolving" in r.getMessage() for r in caplog.records)


def test_exception_mid_write_leaves_nothing_and_retry_succeeds(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    store = target.store()
    good = save(store, 10)

    def serializer_that_dies(f: object) -> None:
        f.write(b"x" * 100_000)  # type: ignore[attr-defined]
        raise RuntimeError("torch.save blew up")

    e0 = store.write(20, "rank0.pt", payload(20, 0))
    with pytest.raises(RuntimeError, match="blew up"):
        store.write(20, "rank1.pt", serializer_that_dies)
    assert not target.exists("step-000000000020.0/rank1.pt")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == good  # latest validates: newer junk is not even looked at
        assert warnings_of(caplog) == []
        assert list(store.candidates()) == [good]  # walking everything reports the junk once
    (line,) = warnings_of(caplog)
    assert "skipping step 20" in line and "no manifest.json" in line
    assert store.latest()["step"] == 10

    e1 = store.write(20, "rank1.pt", lambda f: f.write(payload(20, 1)))
    m = store.commit(20, [e0, e1], {"world_size": 2})
    assert store.resolve() == m and store.read(m, "rank1.pt") == payload(20, 1)


def test_commit_waits_for_other_ranks_then_times_out(target: Target) -> None:
    store = target.store()
    e0 = store.write(7, "rank0.pt", b"a" * 10)
    ghost = FileEntry("rank1.pt", 10, "0" * 64)
    with pytest.raises(CommitTimeout, match=r"rank1.pt \(absent\)"):
        store.commit(7, [e0, ghost], {}, wait_s=0.3)
    assert store.resolve() is None and committed_steps(store) == []

    def late_rank() -> None:  # a slower rank that finishes while commit waits
        threading.Event().wait(0.3)
        store.write(7, "rank1.pt", b"b" * 10)

    t = threading.Thread(target=late_rank)
    t.start()
    e1 = FileEntry("rank1.pt", 10, hashlib.sha256(b"b" * 10).hexdigest())
    m = store.commit(7, [e0, e1], {}, wait_s=10)
    t.join()
    assert store.read(m, "rank1.pt") == b"b" * 10


# -- corruption ----------------------------------------------------------------------------------------


def test_truncated_file_in_newest_step_is_skipped(target: Target, caplog: pytest.LogCaptureFixture) -> None:
    store = target.store()
    good = save(store, 1100)
    bad = save(store, 1200)
    target.write(f"{bad.prefix}/rank0.pt", payload(1200, 0)[:100])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == good
    (line,) = warnings_of(caplog)
    assert "skipping step 1200" in line and "named by latest" in line
    assert "file rank0.pt is 100 bytes, manifest says 4096" in line


def test_wrong_checksum_detected_on_read_and_load_falls_back(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    store = target.store()
    good = save(store, 1100)
    bad = save(store, 1200)
    rel = f"{bad.prefix}/rank1.pt"
    target.write(rel, b"Z" + target.read(rel)[1:])  # same size, different bytes (bit rot)
    assert store.resolve() == bad  # sizes are fine: only a read can tell
    with pytest.raises(CorruptCheckpoint, match=r"step 1200 .*rank1.pt has sha256 .* manifest says"):
        store.read(bad, "rank1.pt")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = store.load_latest()
    assert loaded is not None and loaded[0] == good
    (line,) = warnings_of(caplog)
    assert "skipping step 1200" in line and "sha256" in line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve(verify_checksums=True) == good
    assert len(warnings_of(caplog)) == 1


def test_manifest_rewritten_after_commit_is_caught(target: Target) -> None:
    store = target.store()
    good = save(store, 1)
    bad = save(store, 2)
    doc = json.loads(target.read(f"{bad.prefix}/{MANIFEST}"))
    doc["files"][0]["sha256"] = "f" * 64
    target.write(f"{bad.prefix}/{MANIFEST}", json.dumps(doc).encode())
    # latest recorded the manifest's sha256, so the rewritten manifest is caught before any read
    assert store.resolve() == good


def test_latest_naming_a_missing_step(target: Target, caplog: pytest.LogCaptureFixture) -> None:
    store = target.store()
    good = save(store, 1100)
    bad = save(store, 1200)
    target.remove_folder(bad.prefix)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == good
    (line,) = warnings_of(caplog)
    assert "skipping step 1200" in line and "named by latest" in line and "missing" in line


def test_garbled_latest_and_foreign_objects(target: Target, caplog: pytest.LogCaptureFixture) -> None:
    store = target.store()
    good = save(store, 3)
    target.write("latest", b"{not json")
    target.write("notes.txt", b"hello")
    target.write("step-12/x", b"not a checkpoint prefix")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == good
    lines = warnings_of(caplog)
    assert len(lines) == 2
    assert "2 foreign object(s)" in lines[0] and "notes.txt" in lines[0] and "step-12/" in lines[0]
    assert "'latest' is unreadable" in lines[1]
    save(store, 4)  # the next commit repairs the pointer through the normal CAS path
    assert store.latest()["step"] == 4


def test_expect_filters_foreign_runs(target: Target, caplog: pytest.LogCaptureFixture) -> None:
    store = target.store()
    mine = save(store, 10, spec_hash="mine")
    save(store, 20, spec_hash="other")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve(expect={"spec_hash": "mine"}) == mine
    (line,) = warnings_of(caplog)
    assert "meta spec_hash is 'other', expected 'mine'" in line
    assert store.resolve(expect={"spec_hash": "nobody"}) is None


# -- fencing and compare-and-swap ----------------------------------------------------------------------


def test_fencing_stale_attempt_cannot_roll_back(target: Target, caplog: pytest.LogCaptureFixture) -> None:
    new = target.store(attempt="job2")
    stale = target.store(attempt="job1")
    stale_entries = [stale.write(500, f"rank{r}.pt", payload(500, r)) for r in range(2)]
    newer = save(new, 800)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = stale.commit(500, stale_entries, {"world_size": 2})
    assert m.step == 500 and target.latest()["prefix"] == newer.prefix
    assert any("not moving it to step 500" in line for line in warnings_of(caplog))
    assert new.resolve() == newer
    save(stale, 800)  # the same step from two attempts: the first keeps latest
    assert target.latest()["prefix"] == newer.prefix


def test_a_later_claim_stops_a_stale_attempt_ahead_of_it(target: Target) -> None:
    """A stale attempt still training (its node lost SLURM, not the store) is ahead of the requeued one
    that resumed from step 100: its next commit is refused before any manifest, ``latest`` and the new
    attempt's checkpoints stay, and it cannot claim the run back (a restart of its workers)."""
    stale = target.store(attempt="41.0", keep_last=1)
    assert stale.claim("41.0") == 1
    save(stale, 100)
    stale_files = [stale.write(140, f"rank{r}.pt", payload(140, r)) for r in range(2)]
    committed_at = target.latest()["updated"]
    new = target.store(attempt="41.1", keep_last=1)
    assert new.claim("41.1") == 2
    # the claim keeps the checkpoint latest names, and its time (pixpro status: the checkpoint's age)
    assert (target.latest()["step"], target.latest()["updated"]) == (100, committed_at)
    with pytest.raises(
        Superseded, match=r"attempt 41\.1 took over this run \(claim 2\) from this attempt 41\.0"
    ):
        stale.commit(140, stale_files, {"world_size": 2})
    assert committed_steps(target.store()) == [100]  # no manifest of the stale step
    newer = save(new, 110)
    assert target.latest()["prefix"] == newer.prefix and target.latest()["generation"] == 2
    with pytest.raises(
        Superseded, match=r"attempt 41\.1 took over this run \(claim 2\) after this attempt 41\.0"
    ):
        target.store(attempt="41.0.r1").claim("41.0")
    assert target.store(attempt="41.1.r1").claim("41.1") == 2  # the live attempt's restart keeps its claim
    save(new, 120)
    assert committed_steps(target.store()) == [120]  # keep_last 1: the new attempt prunes as before


def test_status_shows_the_progress_of_the_attempt_that_holds_the_run(target: Target) -> None:
    """Until its next checkpoint stops it, a stale attempt still writes metrics, newer than the live
    attempt's: ``pixpro status`` shows the live one's (its restarts' too), the stale one's only where the
    live one has written none."""
    stale = target.store(attempt="41.0")
    assert stale.claim("41.0") == 1
    save(stale, 100)
    new = target.store(attempt="41.1")
    assert new.claim("41.1") == 2
    now = time.time()

    def record(attempt: str, step: int, age_s: float) -> None:
        line = json.dumps({"step": step, "time": now - age_s}) + "\n"
        new.put_aux(f"{METRICS_DIR}/{attempt}.000000.jsonl", line.encode())

    record("41.0", 180, 1)
    assert read_progress(target.store()).metrics["step"] == 180  # the live attempt has said nothing yet
    record("41.1.r1", 104, 5)
    record("41.1", 102, 20)
    assert read_progress(target.store()).metrics["step"] == 104


def test_a_claim_on_a_run_without_checkpoints_names_none(target: Target) -> None:
    """The first attempt claims before its first checkpoint: readers still see no checkpoint, and a
    store that claims nothing (export, eval, status) commits without resetting the claim."""
    first = target.store(attempt="7.0")
    assert first.claim("7.0") == 1
    assert first.latest() is None and first.resolve() is None and first.latest_manifest() is None
    assert list(first.candidates()) == []
    assert json.loads(target.read("latest"))["generation"] == 1
    unclaimed = target.store(attempt="tool")
    save(unclaimed, 5)
    pointer = target.latest()
    assert (pointer["step"], pointer["generation"], pointer["owner"]) == (5, 1, "7.0")
    assert first.resolve().step == 5
    save(first, 6)
    assert target.store(attempt="7.1").claim("7.1") == 2


def test_a_garbled_latest_does_not_let_a_stale_attempt_claim_back(target: Target) -> None:
    """``latest`` garbled (or deleted) after two claims: the claims on record keep generations rising, so
    the next claim still passes both, and the stale attempt cannot claim its way back."""
    stale, live = target.store(attempt="5.0"), target.store(attempt="5.1")
    assert (stale.claim("5.0"), live.claim("5.1")) == (1, 2)
    save(live, 10)
    target.write("latest", b"{not json")
    with pytest.raises(
        Superseded, match=r"attempt 5\.1 took over this run \(claim 2\) after this attempt 5\.0"
    ):
        target.store(attempt="5.0.r1").claim("5.0")
    assert live.claim("5.1") == 3  # its own restart: a claim again, above every record
    with pytest.raises(Superseded):
        save(stale, 20)
    assert save(live, 30).step == 30


def test_two_attempts_claiming_at_once_get_their_own_generations(target: Target) -> None:
    """Claims race by compare-and-swap: each gets its own generation, and only the holder of the newest
    may commit."""
    claimed: dict[str, int] = {}
    stores = {f"{k}.0": target.store(attempt=f"{k}.0") for k in range(4)}
    threads = [
        threading.Thread(target=lambda o=o, s=s: claimed.update({o: s.claim(o)})) for o, s in stores.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed.values())) == 4  # one each (a racer may skip past another's record)
    holder = max(claimed, key=claimed.__getitem__)
    assert json.loads(target.read("latest"))["owner"] == holder
    for owner, store in stores.items():
        if owner == holder:
            assert save(store, 10).step == 10
        else:
            with pytest.raises(Superseded):
                save(store, 20)


def test_cas_race_threads(target: Target) -> None:
    steps = list(range(1, 25))
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            store = target.store(attempt=f"w{k}", keep_last=50)
            for step in steps[k::4]:
                store.commit(step, [store.write(step, "rank0.pt", payload(step, 0, 64))], {})
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    observed: list[int] = []
    stop = threading.Event()

    def watcher() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError, ValueError):
                observed.append(target.latest()["step"])

    w = threading.Thread(target=watcher)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    assert not errors
    assert target.latest()["step"] == max(steps)
    assert observed == sorted(observed), "latest went backwards"
    assert committed_steps(target.store()) == steps


# -- auxiliary objects and guards ----------------------------------------------------------------------


def test_aux_objects_beside_checkpoints(target: Target, caplog: pytest.LogCaptureFixture) -> None:
    store = target.store(keep_last=1)
    store.put_aux("status.json", b'{"state": "running"}')
    store.put_aux("run.json", b"{}")
    store.put_aux("metrics/job1.0.000000.jsonl", b'{"step": 1}\n')
    store.put_aux("metrics/job1.1/000000.jsonl", b'{"step": 2}\n')
    save(store, 1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        save(store, 2)
        assert store.resolve().step == 2
    assert warnings_of(caplog) == []  # aux objects are neither foreign nor pruned
    assert store.read_aux("status.json") == b'{"state": "running"}'
    assert store.read_aux("metrics/nope.jsonl") is None
    assert store.list_aux("metrics") == ["metrics/job1.0.000000.jsonl", "metrics/job1.1/000000.jsonl"]
    store.delete_aux("run.json")
    store.delete_aux("run.json")  # absent is fine
    assert store.read_aux("run.json") is None
    for bad in ("latest", "step-000000000001.0/x", "metrics/../latest", "other.json"):
        with pytest.raises(ValueError):
            store.put_aux(bad, b"x")


def test_meta_guards_and_attempt_names(target: Target) -> None:
    store = target.store()
    m = save(store, 9, world=3)
    assert store.load_latest()[1]["rank2.pt"] == payload(9, 2)
    with pytest.raises(ValueError, match="credential"):
        store.commit(9, list(m.files), {"aws_secret_access_key": "x"})
    with pytest.raises(ValueError):
        target.store(attempt="bad/attempt")


# -- local folder and other fsspec filesystems only ----------------------------------------------------


def _process_writer(root: str, k: int, steps: list[int]) -> None:
    store = CheckpointStore(root, attempt=f"p{k}", keep_last=100)
    for step in steps:
        store.commit(step, [store.write(step, "rank0.pt", payload(step, 0, 64))], {})


def test_cas_race_processes_on_a_local_folder(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_process_writer, args=(str(tmp_path), k, list(range(k, 60, 3)))) for k in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store = CheckpointStore(str(tmp_path))
    assert store.latest()["step"] == 59
    assert committed_steps(store) == list(range(60)) and store.resolve().step == 59


def test_other_fsspec_protocols_work_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://pixpro-test/{os.getpid()}-{threading.get_ident()}"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store = CheckpointStore(url, keep_last=1)
    assert "no conditional writes" in warnings_of(caplog)[0]
    save(store, 1)
    m = save(store, 2)
    assert committed_steps(store) == [2] and store.resolve() == m
    assert store.load_latest()[1]["rank0.pt"] == payload(2, 0)
