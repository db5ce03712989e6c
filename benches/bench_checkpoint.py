"""Checkpointing cost on real S3 (moto on 127.0.0.1) for a resnet50 PixPro state.

1. Time lost to checkpointing as a fraction of training time, at one checkpoint a minute and one every
   five minutes: the training thread's blocking part of a save (snapshot: serialize + hash + gather)
   plus the slowdown of the steps that run while the upload is in flight, over the interval.
2. Process start -> first step when resuming that state from S3 (python -m launch.train).

    python benches/bench_checkpoint.py [--steps 6] [--size 160] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


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
    pin = ["taskset", "-c", "1"] if "--pin" in sys.argv else []
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


def overhead(endpoint: str, steps: int, size: int, batch: int) -> dict:
    from launch.checkpoint import Checkpointer
    from launch.store import CheckpointStore
    from pixpro.builder import PixPro
    from pixpro.lars import LARS, lars_param_groups

    torch.manual_seed(0)
    model = PixPro(backbone="resnet50").train()
    opt = LARS(lars_param_groups(model, 1e-5), lr=0.1)
    v1, v2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    c = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(batch, 1)

    def step() -> float:
        t = time.perf_counter()
        model.update_target(0.99)
        out = model(v1, v2, c, c)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return time.perf_counter() - t

    step()
    quiet = [step() for _ in range(steps)]
    store = CheckpointStore("s3://bench/overhead", {"client_kwargs": {"endpoint_url": endpoint}}, attempt="b")
    ck = Checkpointer(store, rank=0, world_size=1)
    state = {"state": {"model": model.state_dict(), "optimizer": opt.state_dict()}}
    size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    t = time.perf_counter()
    ck.save(1, state, {"rng": torch.get_rng_state()}, {"step": 1}, blocking=False)
    blocking = time.perf_counter() - t
    t_upload0 = time.perf_counter()
    during = []
    while ck._thread is not None and ck._thread.is_alive():
        during.append(step())
    upload_s = time.perf_counter() - t_upload0
    ck.flush()
    assert ck.last_committed == 1, "the benchmark checkpoint did not commit"
    slowdown = sum(d - statistics.median(quiet) for d in during)
    lost = blocking + max(slowdown, 0.0)
    return {
        "state_mb": size_mb,
        "blocking_s": blocking,
        "upload_s": upload_s,
        "steps_during": len(during),
        "quiet_step_s": statistics.median(quiet),
        "slowdown_s": slowdown,
        "lost_s": lost,
        "frac_1min": lost / 60,
        "frac_5min": lost / 300,
    }


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pin", action="store_true", help="trainer + uploader on core 0, moto on core 1")
    a = p.parse_args()
    server, endpoint = start_moto()
    try:
        if a.pin:  # the trainer and its uploader on core 0, moto on core 1
            os.sched_setaffinity(0, {0})
        torch.set_num_threads(1 if a.pin else 2)
        o = overhead(endpoint, a.steps, a.size, a.batch)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        with tempfile.TemporaryDirectory() as d:
            r = resume_latency(endpoint, Path(d))
    finally:
        server.terminate()
    print("| resnet50 PixPro state to moto S3 | value |")
    print("|---|---|")
    print(f"| model state (online + EMA target) | {o['state_mb']:.0f} MiB |")
    print(f"| training thread blocked per save (serialize + hash) | {o['blocking_s']:.2f} s |")
    upload = f"{o['upload_s']:.1f} s ({o['steps_during']} steps ran meanwhile)"
    print(f"| background upload + commit | {upload} |")
    print(
        f"| step slowdown while uploading (sum) | {o['slowdown_s']:.2f} s "
        f"(quiet step {o['quiet_step_s']:.2f} s) |"
    )
    print(f"| time lost per checkpoint | {o['lost_s']:.2f} s |")
    print(f"| fraction lost, checkpoint every minute | {100 * o['frac_1min']:.2f} % |")
    print(f"| fraction lost, checkpoint every 5 minutes (goal <= 1 %) | {100 * o['frac_5min']:.2f} % |")
    print(f"| resume: process start -> state loaded from S3 | {r.get('resumed_s', float('nan')):.1f} s |")
    print(f"| resume: process start -> first step done | {r.get('first_step_s', float('nan')):.1f} s |")


if __name__ == "__main__":
    main()
