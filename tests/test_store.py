"""CheckpointStore on a local folder: the commit protocol, corruption handling, fencing and CAS races."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import threading
from pathlib import Path

import pytest

from launch.store import (
    MANIFEST,
    CheckpointExists,
    CheckpointStore,
    CommitTimeout,
    CorruptCheckpoint,
    FileEntry,
    Manifest,
)

LOGGER = "launch.store"


def payload(step: int, rank: int, size: int = 4096) -> bytes:
    return (f"step={step} rank={rank};".encode() * size)[:size]


def save(store: CheckpointStore, step: int, world: int = 2, size: int = 4096, **meta: object) -> Manifest:
    entries = [store.write(step, f"rank{r}.pt", payload(step, r, size)) for r in range(world)]
    return store.commit(step, entries, {"world_size": world, "spec_hash": "abc", **meta}, wait_s=5)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_round_trip_and_layout(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), attempt="j1")
    m = save(store, 1234)
    assert m.prefix == "step-000000001234.j1"
    assert sorted(os.listdir(tmp_path / m.prefix)) == ["manifest.json", "rank0.pt", "rank1.pt"]
    doc = json.loads((tmp_path / m.prefix / MANIFEST).read_text())
    assert doc["step"] == 1234 and doc["attempt"] == "j1" and doc["meta"]["world_size"] == 2
    assert [f["name"] for f in doc["files"]] == ["rank0.pt", "rank1.pt"]
    ptr = json.loads((tmp_path / "latest").read_text())
    assert ptr["step"] == 1234 and ptr["prefix"] == m.prefix

    got = store.resolve()
    assert got == m
    assert store.read(got, "rank1.pt") == payload(1234, 1)
    loaded = store.load_latest(["rank0.pt"])
    assert loaded is not None and loaded[1] == {"rank0.pt": payload(1234, 0)}
    assert store.list_steps() == [1234]


def test_empty_store_resolves_to_none(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "nothing-yet"))
    assert store.resolve() is None and store.load_latest() is None and store.list_steps() == []


def test_latest_moves_and_keep_last_prunes(tmp_path: Path) -> None:
    store = CheckpointStore(f"file://{tmp_path}", keep_last=2)
    for step in (100, 200):
        save(store, step)
        assert store.latest()["step"] == step
    # junk from a crashed older attempt, below everything kept: pruned too
    junk = CheckpointStore(str(tmp_path), attempt="crashed")
    junk.write(150, "rank0.pt", b"partial")
    for step in (300, 400):
        save(store, step)
    assert store.list_steps() == [300, 400]
    assert not any(p.name.startswith("step-000000000150") for p in tmp_path.iterdir())
    assert store.resolve().step == 400


def test_write_refuses_a_committed_prefix(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    save(store, 5)
    with pytest.raises(CheckpointExists):
        store.write(5, "rank0.pt", b"again")
    # a new attempt writes the same step into its own prefix
    save(CheckpointStore(str(tmp_path), attempt="1"), 5)


def test_exception_mid_write_leaves_nothing_and_retry_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(str(tmp_path))
    good = save(store, 10)

    def serializer_that_dies(f: object) -> None:
        f.write(b"x" * 1000)  # type: ignore[attr-defined]
        raise RuntimeError("torch.save blew up")

    e0 = store.write(20, "rank0.pt", payload(20, 0))
    with pytest.raises(RuntimeError, match="blew up"):
        store.write(20, "rank1.pt", serializer_that_dies)
    assert not (tmp_path / "step-000000000020.0" / "rank1.pt").exists()
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


def test_commit_waits_for_other_ranks_then_times_out(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    e0 = store.write(7, "rank0.pt", b"a" * 10)
    ghost = FileEntry("rank1.pt", 10, "0" * 64)
    with pytest.raises(CommitTimeout, match=r"rank1.pt \(absent\)"):
        store.commit(7, [e0, ghost], {}, wait_s=0.3)
    assert store.resolve() is None and store.list_steps() == []

    # a slower rank that finishes while commit waits
    def late_rank() -> None:
        threading.Event().wait(0.3)
        store.write(7, "rank1.pt", b"b" * 10)

    t = threading.Thread(target=late_rank)
    t.start()
    e1 = FileEntry("rank1.pt", 10, hashlib.sha256(b"b" * 10).hexdigest())
    m = store.commit(7, [e0, e1], {}, wait_s=10)
    t.join()
    assert store.read(m, "rank1.pt") == b"b" * 10


def test_truncated_file_in_newest_step_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(str(tmp_path))
    good = save(store, 1100)
    bad = save(store, 1200)
    (tmp_path / bad.prefix / "rank0.pt").write_bytes(payload(1200, 0)[:100])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == good
    (line,) = warnings_of(caplog)
    assert "skipping step 1200" in line and "named by latest" in line
    assert "file rank0.pt is 100 bytes, manifest says 4096" in line


def test_wrong_checksum_detected_on_read_and_load_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(str(tmp_path))
    good = save(store, 1100)
    bad = save(store, 1200)
    path = tmp_path / bad.prefix / "rank1.pt"
    path.write_bytes(b"Z" + path.read_bytes()[1:])  # same size, different bytes (bit rot)
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


def test_manifest_with_wrong_checksum_entry(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    good = save(store, 1)
    bad = save(store, 2)
    doc = json.loads((tmp_path / bad.prefix / MANIFEST).read_text())
    doc["files"][0]["sha256"] = "f" * 64
    (tmp_path / bad.prefix / MANIFEST).write_text(json.dumps(doc))
    # latest recorded the manifest's sha256, so the rewritten manifest is caught before any read
    assert store.resolve() == good


def test_latest_naming_missing_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(str(tmp_path))
    good = save(store, 1100)
    bad = save(store, 1200)
    for f in (tmp_path / bad.prefix).iterdir():
        f.unlink()
    (tmp_path / bad.prefix).rmdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == good
    (line,) = warnings_of(caplog)
    assert "skipping step 1200" in line and "named by latest" in line and "missing" in line


def test_garbled_latest_and_foreign_objects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(str(tmp_path))
    good = save(store, 3)
    (tmp_path / "latest").write_text("{not json")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "step-12").mkdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve() == good
    lines = warnings_of(caplog)
    assert len(lines) == 2
    assert "2 foreign object(s)" in lines[0] and "notes.txt" in lines[0] and "step-12/" in lines[0]
    assert "'latest' is unreadable" in lines[1]
    # the next commit repairs the pointer through the normal CAS path
    save(store, 4)
    assert store.latest()["step"] == 4


def test_expect_filters_foreign_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(str(tmp_path))
    mine = save(store, 10, spec_hash="mine")
    save(store, 20, spec_hash="other")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.resolve(expect={"spec_hash": "mine"}) == mine
    (line,) = warnings_of(caplog)
    assert "meta spec_hash is 'other', expected 'mine'" in line
    assert store.resolve(expect={"spec_hash": "nobody"}) is None


def test_fencing_stale_attempt_cannot_roll_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    new = CheckpointStore(str(tmp_path), attempt="job2")
    stale = CheckpointStore(str(tmp_path), attempt="job1")
    stale_entries = [stale.write(500, f"rank{r}.pt", payload(500, r)) for r in range(2)]
    newer = save(new, 800)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = stale.commit(500, stale_entries, {"world_size": 2})
    assert m.step == 500 and store_latest(tmp_path)["prefix"] == newer.prefix
    assert any("not moving it to step 500" in line for line in warnings_of(caplog))
    assert new.resolve() == newer
    # the same step from two attempts: first one keeps latest
    save(stale, 800)
    assert store_latest(tmp_path)["prefix"] == newer.prefix


def store_latest(root: Path) -> dict:
    return json.loads((root / "latest").read_text())


def test_cas_race_threads(tmp_path: Path) -> None:
    steps = list(range(1, 41))
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            store = CheckpointStore(str(tmp_path), attempt=f"w{k}", keep_last=50)
            for step in steps[k::4]:
                e = store.write(step, "rank0.pt", payload(step, 0, 64))
                store.commit(step, [e], {})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    observed: list[int] = []
    stop = threading.Event()

    def watcher() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                observed.append(store_latest(tmp_path)["step"])

    w = threading.Thread(target=watcher)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    assert not errors
    assert store_latest(tmp_path)["step"] == max(steps)
    assert observed == sorted(observed), "latest went backwards"
    assert CheckpointStore(str(tmp_path)).list_steps() == steps


def _process_writer(root: str, k: int, steps: list[int]) -> None:
    store = CheckpointStore(root, attempt=f"p{k}", keep_last=100)
    for step in steps:
        store.commit(step, [store.write(step, "rank0.pt", payload(step, 0, 64))], {})


def test_cas_race_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_process_writer, args=(str(tmp_path), k, list(range(k, 60, 3)))) for k in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert store_latest(tmp_path)["step"] == 59
    store = CheckpointStore(str(tmp_path))
    assert store.list_steps() == list(range(60)) and store.resolve().step == 59


def test_delete_and_list(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep_last=5)
    for step in (1, 2, 3):
        save(store, step)
    store.delete(2)
    assert store.list_steps() == [1, 3]
    with pytest.raises(Exception, match="latest names"):
        store.delete(3)


def test_write_async_and_meta_guards(tmp_path: Path) -> None:
    with CheckpointStore(str(tmp_path)) as store:
        futs = [store.write_async(9, f"rank{r}.pt", payload(9, r)) for r in range(3)]
        m = store.commit(9, [f.result() for f in futs], {"world_size": 3})
        assert store.load_latest()[1]["rank2.pt"] == payload(9, 2)
        with pytest.raises(ValueError, match="credential"):
            store.commit(9, list(m.files), {"aws_secret_access_key": "x"})
    with pytest.raises(ValueError):
        CheckpointStore(str(tmp_path), attempt="bad/attempt")


def test_other_fsspec_protocols_work_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://pixpro-test/{os.getpid()}-{threading.get_ident()}"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store = CheckpointStore(url, keep_last=1)
    assert "no conditional writes" in warnings_of(caplog)[0]
    save(store, 1)
    m = save(store, 2)
    assert store.list_steps() == [2] and store.resolve() == m
    assert store.load_latest()[1]["rank0.pt"] == payload(2, 0)


def test_aux_objects_beside_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(str(tmp_path), keep_last=1)
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
    for bad in ("latest", "step-000000000001.0/x", "metrics/../latest", "other.json"):
        with pytest.raises(ValueError):
            store.put_aux(bad, b"x")
