"""Checkpointing cost on real S3 (moto on 127.0.0.1) for a resnet50 PixPro state: the uploader
process (``launch.checkpoint``) side by side with the thread-based checkpointer it replaced (loaded from
git at ``BASELINE_REV``), interleaved in one run so the load of a shared machine falls on both alike.

1. Time lost to checkpointing, as a fraction of training time at one checkpoint every 5 minutes (and
   every minute): the training thread's stall per save plus the slowdown of the steps that ran while
   the upload was in flight (against the quiet steps just before it). Pinned (trainer on core 0; the
   uploader process, or for the thread version nothing extra, and moto on core 1) and unpinned.
2. Peak extra host memory during a save (all our processes' anonymous + shared-memory pages).
3. Process start -> first step when resuming that state from S3 (python -m launch.train), and where the
   time goes: imports, download, deserialization, the rest (model build, DataLoader, the step).

    python benches/bench_checkpoint.py [--quiet-s 8] [--size 96] [--batch 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "f7a6ff3"  # the last commit with the thread-based launch/checkpoint.py


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto in its own process (with --pin: on the second core, away from the trainer)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench-key-id",
        AWS_SECRET_ACCESS_KEY="bench-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
    )
    pin = ["taskset", "-c", "1"]  # pinned rounds keep the trainer off this core
    server = subprocess.Popen(
        [*pin, sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir("bench")
    return server, endpoint


def thread_checkpointer() -> Any:
    """The thread-based Checkpointer as it was at BASELINE_REV (its source from git, not a copy here)."""
    src = subprocess.run(
        ["git", "show", f"{BASELINE_REV}:launch/checkpoint.py"], cwd=REPO, capture_output=True, text=True
    )
    if src.returncode != 0:
        raise SystemExit(f"bench_checkpoint: git show {BASELINE_REV} failed: {src.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "thread_checkpointer.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("thread_checkpointer", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Checkpointer


def _kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _memory_kib(pids: list[int]) -> int:
    """Anonymous + shared-memory resident pages of these processes (the shm buffer counted once)."""
    total = 0
    for i, pid in enumerate(pids):
        with contextlib.suppress(OSError, StopIteration):
            total += _kib(pid, "RssAnon") + (_kib(pid, "RssShmem") if i == 0 else 0)
    return total


class Peak:
    """Samples the memory of some processes every 50 ms while a block runs."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids, self.peak, self._stop = pids, 0, threading.Event()

    def __enter__(self) -> Peak:
        self.base = _memory_kib(self.pids())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _memory_kib(self.pids()))
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Bench:
    """One ResNet-50 PixPro model and optimizer, stepped on fixed random views."""

    def __init__(self, size: int, batch: int) -> None:
        from pixpro.builder import PixPro
        from pixpro.lars import LARS, lars_param_groups

        torch.manual_seed(0)
        self.model = PixPro(backbone="resnet50").train()
        self.opt = LARS(lars_param_groups(self.model, 1e-5), lr=0.1)
        self.v1, self.v2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
        self.c = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(batch, 1)
        self.step()  # LARS momentum exists from here on: the state has its full size

    def step(self) -> float:
        t = time.perf_counter()
        self.model.update_target(0.99)
        out = self.model(self.v1, self.v2, self.c, self.c)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.opt.step()
        return time.perf_counter() - t

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def state_mib(self) -> float:
        from launch.snapshot import plan

        return plan(self.state())[3] / 2**20


def _runq_wait_s() -> float:
    """Seconds this thread has waited, runnable, for a core (another process or thread had it)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def steps_for(bench: Bench, seconds: float) -> tuple[int, float, float, float]:
    """Step for about ``seconds``: (steps, wall s, this process's CPU s, s waited for a core)."""
    t, c, w, n = time.perf_counter(), time.process_time(), _runq_wait_s(), 0
    while time.perf_counter() - t < seconds:
        bench.step()
        n += 1
    return n, time.perf_counter() - t, time.process_time() - c, _runq_wait_s() - w


def one_save(bench: Bench, ck: Any, busy: Callable[[], bool], step: int, quiet_s: float, pids: Any) -> dict:
    """One save between two quiet windows: the steps that overlap the upload, against the mean step
    of the windows just before and after it, and the stall of the save call itself.

    Wall time counts whatever else the shared machine runs. Two views that do not: this process's CPU
    time (all of serialize + hash + upload for the thread version, the copy for the process version:
    what a GPU node's feeding thread would lose to it), and the wall loss less the extra time the
    training thread waited for a core (for the pinned process version those waits are other sessions'
    processes crowding onto core 0 while ours keep core 1 busy; for the thread version they include
    its own upload thread, so that column flatters it)."""
    n0, t0, c0, w0 = steps_for(bench, quiet_s)
    with Peak(pids) as mem:
        t, c, w = time.perf_counter(), time.process_time(), _runq_wait_s()
        ck.save(step, bench.state(), {"rng": torch.get_rng_state()}, {"step": step}, blocking=False)
        stall = time.perf_counter() - t
        during = 0
        while busy():
            bench.step()
            during += 1
        upload_s, upload_cpu, wait = time.perf_counter() - t, time.process_time() - c, _runq_wait_s() - w
    assert ck.last_committed == step, f"the benchmark checkpoint {step} did not commit"
    n1, t1, c1, w1 = steps_for(bench, quiet_s)
    n = n0 + n1
    lost = upload_s - during * (t0 + t1) / n  # the stall, plus the overlapped steps beyond the mean
    return {
        "stall_s": stall,
        "upload_s": upload_s,
        "steps_during": during,
        "quiet_step_s": (t0 + t1) / n,
        "lost_s": lost,
        "lost_no_waits_s": lost - (wait - during * (w0 + w1) / n),
        "trainer_cpu_s": upload_cpu - during * (c0 + c1) / n,
        "extra_mib": (mem.peak - mem.base) / 1024,
    }


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of a process (sched_setaffinity on a pid moves only its main thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cores)


def overhead(endpoint: str, a: argparse.Namespace) -> dict[str, list[dict]]:
    """Both checkpointers, pinned and unpinned, interleaved round by round; one warm-up save each
    (imports, S3 client, the uploader's start and its shared buffer), as in a trainer after its first."""
    from launch.checkpoint import Checkpointer
    from launch.store import CheckpointStore

    bench = Bench(a.size, a.batch)
    opts = {"client_kwargs": {"endpoint_url": endpoint}}
    me = os.getpid()
    all_cores = set(range(os.cpu_count() or 1))
    thread_cls = thread_checkpointer()
    cks: dict[tuple[str, bool], Any] = {}
    for pinned in (True, False):
        for kind in ("thread", "process"):
            store = CheckpointStore(f"s3://bench/{kind}-{pinned}", opts, attempt="b")
            cks[kind, pinned] = thread_cls(store, 0, 1) if kind == "thread" else Checkpointer(store, 0, 1)
    results: dict[str, list[dict]] = {}
    step = 0
    for r in range(a.rounds + 1):  # round 0 warms up
        for pinned in (True, False):
            for kind in ("thread", "process"):
                ck = cks[kind, pinned]
                pin(os.getpid(), {0} if pinned else all_cores)
                torch.set_num_threads(1)  # unpinned differs only in where the OS may run things
                if kind == "thread":

                    def busy(ck: Any = ck) -> bool:
                        return ck._thread is not None and ck._thread.is_alive()

                    def pids() -> list[int]:
                        return [me]
                else:
                    while not ck._ready:
                        time.sleep(0.1)
                    pin(ck._proc.pid, {1} if pinned else all_cores)
                    busy = ck.busy

                    def pids(ck: Any = ck) -> list[int]:
                        return [me] + ([ck._proc.pid] if ck._proc is not None else [])

                step += 1
                res = one_save(bench, ck, busy, step, a.quiet_s, pids)
                name = f"{kind}, {'pinned' if pinned else 'unpinned'}"
                print(f"round {r} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True)
                if r > 0:
                    results.setdefault(name, []).append(res)
    for (kind, _), ck in cks.items():
        if kind == "process":
            ck.close()
    pin(os.getpid(), all_cores)
    results["state_mib"] = [{"mib": bench.state_mib()}]
    return results


def resume_latency(endpoint: str, work: Path) -> dict:
    from pixpro.demo_data import generate_demo_dataset

    generate_demo_dataset(work / "data", num_images=8, image_size=80, seed=0)
    spec = {
        "name": "bench",
        "data": {"root": str(work / "data" / "images"), "crop_size": 64, "batch_size": 2, "num_workers": 0},
        "model": {"backbone": "resnet50"},
        "optim": {"epochs": 1, "warmup_epochs": 0, "max_steps": 2},
        "precision": "fp32",
        "checkpoint": {
            "url": "s3://bench/resume",
            "every_minutes": None,
            "storage_options": {"client_kwargs": {"endpoint_url": endpoint}},
        },
    }
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.run(
        [sys.executable, "-m", "launch.train", str(path), "--run-dir", str(work / "run")],
        cwd=REPO,
        env=dict(env, PIXPRO_STOP_AT_STEP="1"),
        capture_output=True,
    )
    assert first.returncode == 75, first.stderr[-2000:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.train", str(path), "--run-dir", str(work / "run")],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    marks = {}
    for line in proc.stderr:
        now = time.perf_counter() - t0
        if "no committed checkpoint" in line:
            raise RuntimeError("resume found no checkpoint")
        if "resumed from step 1" in line:
            marks["resumed_s"] = now
        if "step 2/2" in line:
            marks["first_step_s"] = now
    proc.wait()
    return marks


def resume_parts(endpoint: str) -> dict:
    """Where a resume's time goes, each part alone in a fresh process or in this one."""

    def fresh(code: str) -> float:
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO))
        )
        return time.perf_counter() - t

    from launch.checkpoint import from_bytes
    from launch.store import CheckpointStore

    store = CheckpointStore("s3://bench/resume", {"client_kwargs": {"endpoint_url": endpoint}})
    t = time.perf_counter()
    m = store.resolve()
    assert m is not None
    data = {n: store.read(m, n) for n in m.names}
    download = time.perf_counter() - t
    t = time.perf_counter()
    for blob in data.values():
        from_bytes(blob)
    return {
        "python_s": fresh("pass"),
        "import_torch_s": fresh("import torch"),
        "import_trainer_s": fresh("import launch.train"),
        "import_uploader_s": fresh("import launch.uploader"),
        "download_s": download,
        "deserialize_s": time.perf_counter() - t,
        "mb": sum(len(b) for b in data.values()) / 1e6,
    }


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quiet-s", type=float, default=8.0, help="quiet stepping before and after each save")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    server, endpoint = start_moto()
    try:
        o = overhead(endpoint, a)
        with tempfile.TemporaryDirectory() as d:
            r = resume_latency(endpoint, Path(d))
        parts = resume_parts(endpoint)
    finally:
        server.terminate()
    mib = o.pop("state_mib")[0]["mib"]
    print(f"\nresnet50 PixPro state {mib:.0f} MiB to moto S3; medians of {a.rounds} interleaved rounds")
    print(f"(steps at {a.size} px, batch {a.batch}; pinned: trainer on core 0, uploader + moto on core 1;")
    print("lost = upload time - steps meanwhile x mean quiet step)\n")
    print(
        "| checkpointer | stall per save | upload + commit | steps meanwhile | lost per save (wall) "
        "| lost at 1/5 min (goal ≤ 1 %) | lost less core waits | at 1/5 min | trainer-process CPU per save "
        "| at 1/5 min | peak extra memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in o.items():
        lost, calm, cpu = (_median(rows, k) for k in ("lost_s", "lost_no_waits_s", "trainer_cpu_s"))
        print(
            f"| {name} | {_median(rows, 'stall_s'):.2f} s | {_median(rows, 'upload_s'):.1f} s "
            f"| {_median(rows, 'steps_during'):.0f} (quiet step {_median(rows, 'quiet_step_s'):.2f} s) "
            f"| {lost:.2f} s | {100 * lost / 300:.2f} % | {calm:.2f} s | {100 * calm / 300:.2f} % "
            f"| {cpu:.2f} s | {100 * cpu / 300:.2f} % | {_median(rows, 'extra_mib'):.0f} MiB |"
        )
    print("\n| resume from S3 (launch.train, resnet50) | s |")
    print("|---|---|")
    print(f"| process start -> state loaded | {r.get('resumed_s', float('nan')):.1f} |")
    print(f"| process start -> first step done (goal ≤ 15 s) | {r.get('first_step_s', float('nan')):.1f} |")
    print(f"| of which: python start | {parts['python_s']:.1f} |")
    print(f"| import torch (fresh process) | {parts['import_torch_s']:.1f} |")
    print(f"| import launch.train (fresh process, torch included) | {parts['import_trainer_s']:.1f} |")
    print(f"| import launch.uploader (its own process, in parallel) | {parts['import_uploader_s']:.1f} |")
    print(f"| download {parts['mb']:.0f} MB (resolve + read + sha256) | {parts['download_s']:.1f} |")
    print(f"| deserialize (torch.load, weights_only) | {parts['deserialize_s']:.1f} |")


if __name__ == "__main__":
    main()
