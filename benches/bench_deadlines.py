"""How long the deadline paths take, which the tests assert only as outcomes.

A save returned, a stalled call gave up, a hung check was killed: the tests wait for the event (with a
generous cap), and the time it took is measured here, so a loaded CI machine cannot fail a test.

Every row runs against real stores (a local folder; a moto server on loopback, through the tests' fault
proxy) and the real processes; ``limit`` is the figure the test used to assert before it became an
outcome. Rows marked trainer start ``launch.train`` (about a minute each); ``--no-trainer`` skips them.

    python benches/bench_deadlines.py [--reps 3] [--no-trainer]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benches"))

import torch  # noqa: E402

from launch.checkpoint import Checkpointer  # noqa: E402
from launch.store import CheckpointStore, StoreUnavailable  # noqa: E402
from tests.conftest_s3 import MotoS3, moto_server, s3_storage_options  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.support.procs import wait_for  # noqa: E402

Row = tuple[str, list[float], str]


def _state(mib: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(int(mib * 2**20 / 4), generator=g), "step": seed}


def _save(ck: Checkpointer, step: int, state: dict, **kw: Any) -> bool:
    return ck.save(step, state, {"rng": torch.get_rng_state()}, {"step": step}, **kw)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def until_raises(fn: Callable[[], Any], exc: type[Exception]) -> float:
    """Seconds until ``fn()`` raises ``exc`` (it must)."""
    t0 = time.perf_counter()
    try:
        fn()
    except exc:
        return time.perf_counter() - t0
    raise SystemExit(f"{fn} did not raise {exc.__name__}")


@contextmanager
def proxy(moto: MotoS3) -> Iterator[FaultProxy]:
    with FaultProxy((moto.host, moto.port), lifetime_s=900) as p:
        yield p


def uploader_rows(work: Path, moto: MotoS3, reps: int) -> Iterator[Row]:
    """tests/test_uploader.py's saves: a non-blocking save waits for the copy, never for the store."""
    copies, slow, outage, budget = [], [], [], []
    for r in range(reps):
        ck = Checkpointer(CheckpointStore(str(work / f"local{r}"), attempt="t"), 0, 1)
        wait_for("the uploader", lambda ck=ck: ck._ready, 60, 0.05)
        copies.append(timed(lambda ck=ck: _save(ck, 1, _state(8), blocking=False)))
        ck.flush()
        ck.close()
        with proxy(moto) as p:
            url = f"s3://{moto.bucket}/bench-{os.getpid()}-{r}"
            ck = Checkpointer(CheckpointStore(url, s3_storage_options(p.url), attempt="t"), 0, 1)
            assert _save(ck, 1, _state(4, 1), blocking=True)
            p.latency(0.02)
            slow.append(timed(lambda ck=ck: _save(ck, 2, _state(24, 2), blocking=False)))
            p.passthrough()
            assert ck.flush(timeout_s=300)
            p.reset_after(0, once=False)
            saves = [lambda s=s, ck=ck: _save(ck, s, _state(2, s), blocking=False) for s in (3, 4, 5)]
            outage.append(max(timed(save) for save in saves))
            p.passthrough()
            assert ck.flush(timeout_s=300)
            p.stall()
            budget.append(timed(lambda ck=ck: _save(ck, 6, _state(1), blocking=True, budget_s=4)))
            p.passthrough()
            ck.close()
    yield "non-blocking save of 8 MiB, local folder (returns after the copy)", copies, "< 2 s"
    yield "non-blocking save of 24 MiB, S3 over a slow link", slow, "< 2 s"
    yield "non-blocking save during an S3 outage (slowest of 3)", outage, "< 2 s"
    yield "blocking save with budget_s 4 on a stalled S3 server, until it gives up", budget, "< 6 s"


def store_rows(work: Path, moto: MotoS3, reps: int) -> Iterator[Row]:
    """tests/test_store_s3.py, test_train_data.py, test_status_store.py, test_preflight.py: a stalled or
    unreachable store costs one call's deadline, then a one-line error."""
    from PIL import Image

    from launch.store.s3 import s3_options
    from launch.tools.pack import main as pack_main
    from pixpro.sources import PackedSource, ReadFailed

    write, read, status, probe = [], [], [], []
    src = work / "src" / "a"
    src.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(src / f"{i}.png")
    assert pack_main([str(src.parent), str(work / "packed")]) == 0
    import s3fs

    raw = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto.endpoint}, skip_instance_cache=True)
    packed_url = f"s3://{moto.bucket}/bench-packed-{os.getpid()}"
    raw.put(str(work / "packed"), packed_url.removeprefix("s3://"), recursive=True)
    home = work / "home"
    for r in range(reps):
        with proxy(moto) as p:
            url = f"s3://{moto.bucket}/bench-store-{os.getpid()}-{r}"
            store = CheckpointStore(url, s3_storage_options(p.url), timeout_s=2.0)
            p.stall()
            stalled = lambda store=store: store.write(2, "r.pt", b"x" * 10**6)  # noqa: E731
            write.append(until_raises(stalled, StoreUnavailable))
            p.passthrough()
            opts = s3_options(s3_storage_options(p.url), None) | {"skip_instance_cache": True}
            source = PackedSource(packed_url, opts)
            assert source.read(0)
            p.stall()
            read.append(until_raises(lambda source=source: source.read(1), ReadFailed))
            p.passthrough()
            status.append(_status_on_stall(home / str(r), url, moto, p))
        probe.append(_preflight_unreachable(work / f"pf{r}"))
    yield "S3 write on a stalled server (timeout_s 2) until StoreUnavailable", write, "< 30 s"
    yield "packed-data read on a stalled server until ReadFailed", read, "< 30 s"
    yield "`pixpro status` (a new process) on a stalled server", status, "< 24 s"
    yield "preflight against an unreachable endpoint, one-line problem", probe, "< 60 s"


def _status_on_stall(home: Path, url: str, moto: MotoS3, p: FaultProxy) -> float:
    from tests.test_status_store import _s3_run

    _s3_run(home, url, moto)
    env = {**os.environ, "PIXPRO_HOME": str(home), "PIXPRO_S3_ENDPOINT": p.url}
    p.stall()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "cluster.cli", "status", "s3run", "--json"]
    subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    took = time.perf_counter() - t0
    p.passthrough()
    return took


def _preflight_unreachable(work: Path) -> float:
    from launch import preflight
    from schemas import parse_spec
    from tests.test_preflight import small_spec

    spec = small_spec(
        work,
        checkpoint__url="s3://bucket/run",
        checkpoint__storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}},
    )
    return until_raises(lambda: preflight.run(parse_spec(spec)), preflight.Problem)


def gpu_check_rows(work: Path, reps: int) -> Iterator[Row]:
    """tests/test_gpu_check.py: a check past its budget (1 s here) is killed with its process tree."""
    import json

    from gpu_checks import plan, runner

    killed = []
    for r in range(reps):
        d = work / f"gc{r}"
        for sub in ("results", "logs"):
            (d / sub).mkdir(parents=True)
        ctx = {"mode": "cpu", "quick": True, "sizes": plan.sizes(True, True), "data": str(d), "work": str(d)}
        (d / "ctx.json").write_text(json.dumps(ctx))
        killed.append(runner.run_check(plan.BY_NAME["job"], 1.0, d / "ctx.json", d, "cpu")["seconds"])
    yield "gpu_check: a check with a 1 s budget, killed with its tree", killed, "< 10 s"


def trainer_rows(work: Path, moto: MotoS3) -> Iterator[Row]:
    """tests/test_train_uploader.py and test_train_s3.py: one trainer run each."""
    from launch.preempt import children_of
    from tests.support.trainer import Tail, start_trainer, tiny_spec, write_spec

    work.mkdir(parents=True)
    longer = {"optim__epochs": 7, "optim__max_steps": 40}
    spec = write_spec(work / "lead.json", tiny_spec(work / "data", resources__signal_lead_s=10, **longer))
    proc = start_trainer(spec, work / "lead")
    with Tail(proc) as out:
        out.wait_for(" committed in ")
        (uploader,) = children_of(proc.pid)
        os.kill(uploader, signal.SIGSTOP)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
        gave_up = time.perf_counter() - t0
    name = "SIGTERM with a hung uploader (lead 10 s, commit_s 7.5 s) until the trainer exits"
    yield name, [gave_up], "7-20 s"

    with proxy(moto) as p:
        url = f"s3://{moto.bucket}/bench-stall-{os.getpid()}"
        more = {"optim__epochs": 100, "optim__max_steps": 150, "checkpoint__every_steps": 5}
        spec = write_spec(
            work / "stall.json",
            tiny_spec(
                work / "data",
                checkpoint__url=url,
                checkpoint__storage_options=s3_storage_options(p.url),
                **more,
            ),
        )
        observer = CheckpointStore(url, s3_storage_options(moto.endpoint))
        proc = start_trainer(spec, work / "stall")
        with Tail(proc) as out:
            out.wait_for(" committed in ")
            p.stall_for(30.0)
            assert p.stall_ended.wait(300)
            before = (observer.latest() or {}).get("step", 0)
            wait_for("a commit", lambda: (observer.latest() or {}).get("step", 0) > before, 300, 0.1)
            after = time.monotonic() - (p.stall_ended_at or 0.0)
            proc.wait(timeout=600)
    yield "first commit after a 30 s S3 stall ends, mid-run", [after], "<= 30 s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-trainer", action="store_true", help="skip the two rows that start a trainer")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, moto_server() as moto:
        work = Path(tmp)
        for part in (
            uploader_rows(work / "up", moto, args.reps),
            store_rows(work / "st", moto, args.reps),
            gpu_check_rows(work / "gc", args.reps),
            () if args.no_trainer else trainer_rows(work / "tr", moto),
        ):
            for row in part:
                rows.append(row)
                print(f"{row[0]}: {' '.join(f'{t:.2f}' for t in row[1])} s", file=sys.stderr, flush=True)
    print(f"\n| path (median of {args.reps}; trainer rows: 1 run) | median (s) | max (s) | old test limit |")
    print("|---|---|---|---|")
    for name, times, limit in rows:
        print(f"| {name} | {statistics.median(times):.2f} | {max(times):.2f} | {limit} |")


if __name__ == "__main__":
    main()
