"""The checkpoint uploader process against real stores (a local folder; moto S3 through the fault proxy):
what training sees of a save, the uploader dying or hanging, an outage, superseding, a preemption's
budget, and the uploader's memory."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

from launch.checkpoint import Checkpointer
from launch.store import CheckpointExists, CheckpointStore, StoreUnavailable
from launch.uploader import Job, Uploader
from schemas.contract import MANIFEST, TRAIN_FILE
from tests.conftest_s3 import s3_storage_options
from tests.support import zygote
from tests.support.procs import wait_for

LOG = "launch.checkpoint"


def _state(mib: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = int(mib * 2**20 / 4)
    return {
        "model": {"w": torch.randn(n // 2, generator=g), "b": torch.randn(n - n // 2, generator=g)},
        "cl": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
        "step": seed,
        "names": ["a", ("b", 1.5)],
    }


def _save(ck: Checkpointer, step: int, state: dict, **kw) -> bool:
    return ck.save(step, state, {"rng": torch.get_rng_state()}, {"step": step}, **kw)


def _store(url: str, options: dict | None = None, attempt: str = "t") -> CheckpointStore:
    return CheckpointStore(url, options, attempt=attempt)


@pytest.fixture
def checkpointers():
    made: list[Checkpointer] = []

    def make(store: CheckpointStore, **kw) -> Checkpointer:
        ck = Checkpointer(store, 0, 1, spare=zygote.uploader(), **kw)
        made.append(ck)
        return ck

    yield make
    for ck in made:
        ck.close()


def _uploader_pid(ck: Checkpointer) -> int:
    wait_for("the uploader to start", lambda: ck._proc is not None and ck._ready, 60, 0.05)
    assert ck._proc is not None
    return ck._proc.pid


def test_save_returns_after_the_copy_and_resume_is_bitwise(tmp_path, checkpointers):
    """A non-blocking save returns while the uploader cannot move (stopped): it waits for the copy only.
    How long the copy takes is benches/bench_deadlines.py's figure."""
    store = _store(str(tmp_path))
    ck = checkpointers(store)
    state = _state(8)
    pid = _uploader_pid(ck)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert _save(ck, 1, state, blocking=False)
        assert ck.busy() and store.latest() is None  # returned before anything was uploaded
    finally:
        os.kill(pid, signal.SIGCONT)
    assert ck.flush() and ck.last_committed == 1
    assert ck.last_commit_s is not None and ck.last_commit_time is not None
    ref = ck._buffers[0].ref  # type: ignore[union-attr]
    state["model"]["w"].add_(1)
    assert _save(ck, 2, state, blocking=True)
    assert ck._buffers[0].ref == ref and ck._buffers[1] is None  # one buffer, reused
    step, loaded, rank_state = ck.load_latest()  # type: ignore[misc]
    assert step == 2 and rank_state is not None
    for k in ("w", "b"):
        assert torch.equal(loaded["model"][k], state["model"][k])
    assert loaded["cl"].stride() == state["cl"].stride() and torch.equal(loaded["cl"], state["cl"])
    assert loaded["names"] == ["a", ("b", 1.5)]


def test_uploader_sigkilled_mid_upload(tmp_path, moto_s3, fault_proxy, s3_url, checkpointers, caplog):
    """Training goes on, the next save succeeds, and ``latest`` never names the torn checkpoint."""
    store = _store(s3_url, s3_storage_options(fault_proxy.url))
    ck = checkpointers(store)
    assert _save(ck, 1, _state(4, 1), blocking=True)
    fault_proxy.latency(0.02)  # a slow link: the next upload takes seconds
    assert _save(ck, 2, _state(24, 2), blocking=False)  # returns with the upload still to come
    pid = _uploader_pid(ck)
    wait_for("an upload under way", lambda: fault_proxy.stats.bytes_up > 2**20, 120, 0.02)  # mid-upload
    assert ck.busy()
    with caplog.at_level(logging.WARNING, logger=LOG):
        os.kill(pid, signal.SIGKILL)
        wait_for("the save to end", lambda: not ck.busy(), 120, 0.05)
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert "exited with status -9 during step 2 (not committed)" in line
    assert store.latest()["step"] == 1
    fault_proxy.passthrough()
    assert _save(ck, 3, _state(4, 3), blocking=True)  # a new uploader took it
    assert store.latest()["step"] == 3 and ck.restarts == 1
    assert [m.step for m in store.candidates()] == [3, 1]  # step 2 never got a manifest
    assert not any(k.endswith(f"000000000002.t/{MANIFEST}") for k in store._backend.scan())


def test_outage_never_blocks_a_save_and_the_newest_state_commits(
    tmp_path, moto_s3, fault_proxy, s3_url, checkpointers, caplog
):
    """While the store is unreachable saves return at once, a due save supersedes the waiting one (at
    most one in flight and one waiting, two buffers), the failure is reported, and the newest commits."""
    store = _store(s3_url, s3_storage_options(fault_proxy.url))
    ck = checkpointers(store)
    assert _save(ck, 1, _state(2, 1), blocking=True)
    fault_proxy.reset_after(0, once=False)  # every connection cut: an outage
    caplog.set_level(logging.INFO, logger=LOG)
    for step in (2, 3, 4):  # each returns while nothing can commit (the time: benches/bench_deadlines.py)
        assert _save(ck, step, _state(2, step), blocking=False)
        if step == 2:
            wait_for("a reported failure", lambda: ck.health()["store_error"] is not None, 60, 0.05)
    assert "failed" in ck.health()["store_error"]
    assert sum(b is not None for b in ck._buffers) == 2

    def gave_up() -> list[str]:  # steps 2 (in flight, told a newer one waits) and 3 (superseded)
        return [m for r in caplog.records if ("superseded" in (m := r.getMessage()) or "abandoned" in m)]

    wait_for("two states given up", lambda: len(gave_up()) >= 2, 60, 0.05)
    fault_proxy.passthrough()
    assert ck.flush(timeout_s=120)
    assert store.latest()["step"] == 4 and ck.last_committed == 4
    assert ck.health()["store_error"] is None
    assert [m.step for m in store.candidates()] == [4, 1]


def test_connections_cut_now_and_then_still_commit(tmp_path, moto_s3, fault_proxy, s3_url, checkpointers):
    store = _store(s3_url, s3_storage_options(fault_proxy.url))
    ck = checkpointers(store)
    state = _state(20, 5)
    with fault_proxy.cuts_now_and_then(every_s=0.3, nbytes=64 * 1024):
        assert _save(ck, 5, state, blocking=True, budget_s=240)
    assert fault_proxy.stats.resets >= 1, fault_proxy.stats
    step, loaded, _ = ck.load_latest()  # type: ignore[misc]
    assert step == 5 and torch.equal(loaded["model"]["w"], state["model"]["w"])


@pytest.mark.parametrize(
    ("limits", "says"),
    [({"retry_for_s": 2.0, "hang_grace_s": 1.0}, "past its deadline"), ({"silent_s": 2.0}, "silent for 2 s")],
    ids=["deadline", "silence"],
)
def test_a_hung_uploader_is_killed(tmp_path, checkpointers, caplog, limits, says):
    store = _store(str(tmp_path))
    ck = checkpointers(store, **limits)
    pid = _uploader_pid(ck)
    os.kill(pid, signal.SIGSTOP)
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert _save(ck, 1, _state(1), blocking=False)
        wait_for("the save to end", lambda: not ck.busy(), 120, 0.05)
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert says in line and "(hung)" in line and "during step 1" in line
    assert store.latest() is None
    # The next save goes to a new uploader; its start alone can take seconds on a loaded machine.
    ck.retry_for_s, ck.hang_grace_s, ck.silent_s = 120.0, 30.0, 180.0
    assert _save(ck, 2, _state(1), blocking=True) and store.latest()["step"] == 2


def test_a_blocking_save_keeps_its_budget_and_says_what_did_not_commit(
    tmp_path, moto_s3, fault_proxy, s3_url, checkpointers, caplog
):
    store = _store(s3_url, s3_storage_options(fault_proxy.url))
    ck = checkpointers(store)
    assert _save(ck, 1, _state(1), blocking=True)
    fault_proxy.stall()  # a hung server: nothing answers
    with caplog.at_level(logging.ERROR, logger=LOG):
        assert not _save(ck, 2, _state(1), blocking=True, budget_s=4)  # gives up (how soon: a bench)
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert "checkpoint step 2 not committed within 4 s" in line
    fault_proxy.passthrough()
    assert store.latest()["step"] == 1
    assert _save(ck, 3, _state(1), blocking=True) and store.latest()["step"] == 3


def test_a_blocking_save_abandons_the_older_upload_in_flight(
    tmp_path, moto_s3, fault_proxy, s3_url, checkpointers, caplog
):
    """At a preemption the final state matters: the upload in flight gives way to it."""
    store = _store(s3_url, s3_storage_options(fault_proxy.url))
    ck = checkpointers(store)
    _uploader_pid(ck)
    fault_proxy.latency(0.02)
    caplog.set_level(logging.INFO, logger=LOG)
    assert _save(ck, 1, _state(24, 1), blocking=False)
    wait_for("an upload under way", lambda: fault_proxy.stats.bytes_up > 2**20, 120, 0.02)
    fault_proxy.passthrough()
    assert _save(ck, 2, _state(1, 2), blocking=True, budget_s=60)
    assert any("checkpoint step 1 abandoned" in r.getMessage() for r in caplog.records)
    assert store.latest()["step"] == 2 and [m.step for m in store.candidates()] == [2]


def _rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def test_the_uploader_streams_without_a_second_full_copy(tmp_path, moto_s3, s3_url, checkpointers):
    """The uploader's own (anonymous) memory grows by a bounded part buffer, not by the state's size:
    it serializes from the trainer's shared memory straight into a multipart upload."""
    store = _store(s3_url, s3_storage_options(moto_s3.endpoint))
    ck = checkpointers(store)
    assert _save(ck, 1, _state(1), blocking=True)  # warm: imports, the S3 client
    pid = _uploader_pid(ck)
    base = _rss_anon_kib(pid)
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(_rss_anon_kib(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    state = _state(160, 2)
    assert _save(ck, 2, state, blocking=True, budget_s=300)
    stop.set()
    sampler.join()
    grown_mib = (max(peak) - base) / 1024
    assert grown_mib < 80, f"uploader grew by {grown_mib:.0f} MiB for a 160 MiB state"
    assert store.latest()["step"] == 2
    entry = next(m for m in store.candidates()).entry(TRAIN_FILE)
    assert entry.size > 160 * 2**20


def test_an_outage_is_retried_and_a_refusal_is_not(tmp_path):
    """A store that is down is tried again until the save's window ends; a store that answered
    ``CheckpointExists`` answered for good, so the job ends at once instead of spending that window."""
    ours, theirs = multiprocessing.Pipe()
    uploader = Uploader(ours, _store(str(tmp_path)), rank=0, world_size=1)
    job = Job(7, {}, [], None, {}, deadline=time.monotonic() + 60)  # type: ignore[arg-type]
    answers = iter([StoreUnavailable("reset"), StoreUnavailable("reset"), "committed"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert uploader._retry(job, "commit step 7", flaky) == "committed"
    calls = []

    def refused() -> None:
        calls.append(time.monotonic())
        raise CheckpointExists("step 7: manifest.json already exists")

    with pytest.raises(CheckpointExists):
        uploader._retry(job, "commit step 7", refused)
    assert len(calls) == 1
    said = []
    while theirs.poll():
        said.append(theirs.recv()[0])
    assert said.count("failing") == 2, said  # the two outages, not the refusal
