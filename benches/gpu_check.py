"""GPU acceptance check: prove pixpro's CUDA path in minutes, on the first GPU that is lent.

    python benches/gpu_check.py OUT [--cpu] [--quick] [--only NAME[,NAME]] [--total-s 460]
    make gpu-check OUT=dir

Every path that only a GPU executes (NCCL, bf16/fp16 autocast with GradScaler, channels_last,
SyncBatchNorm, CUDA RNG in a resume, pinned host copies, the checkpoint copy from device memory,
torch.compile) gets one check; each check runs in its own process under a time budget, so a hung
kernel, a CUDA error or a slow compile costs that check only: it is recorded as ``timeout``/``error``
and the run goes on.
The whole run stays under ``--total-s``. Results: ``OUT/gpu_check.json`` (the record; ``--only`` merges
into an existing one, so a failed check is cheap to rerun) and ``OUT/gpu_check.md`` (the table for
benches/RESULTS.md); each check's output is kept in ``OUT/logs/``. Exit status 1 when any check
failed, erred or timed out (the record is written either way), 2 when no GPU is visible without ``--cpu``.

``--cpu`` runs every check at toy sizes on the CPU (gloo instead of NCCL), so the script cannot rot
between GPU loans; GPU-only parts say "not applicable on CPU". Nothing is downloaded: the network is
built from scratch and the data is generated (pixpro.demo_data).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SCHEMA = "pixpro-gpu-check/1"
STATUSES = ("pass", "fail", "not applicable", "timeout", "error")
RECORD = "gpu_check.json"
TABLE = "gpu_check.md"
GRACE_S = 15.0  # a child gets this long past its budget to write its partial record before it is killed


@dataclass(frozen=True)
class CheckDef:
    """One check: its GPU and CPU budgets (s), and whether it only means something on a GPU."""

    name: str
    title: str
    gpu_s: float
    cpu_s: float
    gpu_only: str = ""  # the one-line reason it does not apply on CPU, if it does not


CHECKS: tuple[CheckDef, ...] = (
    CheckDef("env", "environment", 20, 20),
    CheckDef("dist", "process group at world size 1 (torchrun) + SyncBatchNorm", 60, 40),
    CheckDef("step_bf16_cl", "PixPro steps bf16, channels_last", 45, 25),
    CheckDef(
        "step_fp16_cl",
        "PixPro steps fp16 + GradScaler, channels_last",
        45,
        0,
        "not applicable on CPU: fp16 autocast with GradScaler needs a GPU",
    ),
    CheckDef("step_bf16", "PixPro steps bf16, contiguous", 45, 25),
    CheckDef(
        "step_fp16",
        "PixPro steps fp16 + GradScaler, contiguous",
        45,
        0,
        "not applicable on CPU: fp16 autocast with GradScaler needs a GPU",
    ),
    CheckDef("throughput", "throughput: PixPro step vs floor, peak memory", 50, 30),
    CheckDef("input", "input pipeline: workers per GPU", 50, 30),
    CheckDef("photometric", "photometric steps on the device: same views, cost per batch", 30, 30),
    CheckDef("checkpoint", "checkpoint save/load from device memory", 45, 30),
    CheckDef("resume", "resume on the device: bitwise vs uninterrupted", 90, 60),
    CheckDef("compile", "torch.compile: speed-up and recompiles", 120, 40),
)
BY_NAME = {c.name: c for c in CHECKS}


def sizes(cpu: bool, quick: bool) -> dict[str, Any]:
    """The sizes each check uses: the ImageNet recipe's model and per-GPU batch on a GPU, toys on CPU."""
    if cpu:
        s: dict[str, Any] = {
            "backbone": "resnet18",
            "crop": 64,
            "batch": 8,
            "hidden": 64,
            "proj_out": 32,
            "base_lr": 1.0,
            "steps": 12,
            "images": 48,
            "image_size": 80,
            "resume_batch": 4,
            "resume_steps": 6,
            "resume_stop": 3,
            "resume_workers": 0,
            "dist_batch": 4,
            "dist_steps": 3,
            "ckpt_batch": 4,
            "workers": [0, 1, 2],
            "window_s": 1.0,
            "threads": 1,  # one thread: OpenMP barriers crawl on a shared, oversubscribed CI machine
        }
    else:
        from schemas import load_spec

        recipe = load_spec(REPO / "launch" / "specs" / "imagenet_r50_100ep.json")
        s = {
            "backbone": recipe.model.backbone,
            "crop": recipe.data.crop_size,
            "batch": recipe.data.batch_size,
            "hidden": recipe.model.projector_hidden,
            "proj_out": recipe.model.projector_out,
            "base_lr": recipe.optim.base_lr,
            "steps": 50,
            "images": 256,
            "image_size": 256,
            "resume_batch": 32,
            "resume_steps": 8,
            "resume_stop": 5,
            "resume_workers": 2,
            "dist_batch": 32,
            "dist_steps": 5,
            "ckpt_batch": 32,
            "workers": [1, 2, 4, 8, 12],
            "window_s": 5.0,
            "threads": None,
        }
    if quick:
        s["steps"] = max(10, s["steps"] // 2)
        s["workers"] = s["workers"][::2]
        s["window_s"] /= 2
    return s


# --- record and table ------------------------------------------------------------------------------
def empty_result(check: CheckDef, status: str, reason: str, budget_s: float = 0.0) -> dict[str, Any]:
    return {
        "name": check.name,
        "title": check.title,
        "status": status,
        "reason": reason,
        "summary": "",
        "numbers": {},
        "seconds": 0.0,
        "budget_s": budget_s,
    }


def markdown(record: dict[str, Any]) -> str:
    """The table that goes into benches/RESULTS.md after a run."""
    env: dict[str, Any] = next((c["numbers"] for c in record["checks"] if c["name"] == "env"), {})
    device = (
        env.get("gpu_name", "CPU") if record["mode"] == "gpu" else f"CPU ({env.get('cpu_count', '?')} cores)"
    )
    lines = [
        f"`benches/gpu_check.py` ({record['mode']} mode{', quick' if record['quick'] else ''}), "
        f"{record['started']}, {device}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}, "
        f"cuDNN {env.get('cudnn', '-')}, NCCL {env.get('nccl', '-')}; "
        f"{record['seconds']:.0f} s in all (budget {record['total_budget_s']:.0f} s)",
        "",
        "| check | status | result | s |",
        "|---|---|---|---|",
    ]
    for c in record["checks"]:
        text = c["summary"] or ""
        if c["reason"]:
            text = f"{text}; {c['reason']}" if text else c["reason"]
        text = text.replace("|", "/").replace("\n", " ")
        lines.append(f"| {c['title']} | {c['status']} | {text} | {c['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# --- running the checks ----------------------------------------------------------------------------
def _tail(path: Path, chars: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    last = [line for line in text.splitlines() if line.strip()][-1:] or [""]
    return last[0][-chars:]


def run_check(check: CheckDef, budget: float, ctx_path: Path, out: Path) -> dict[str, Any]:
    """Run one check in a child process of its own session; kill the session past budget + grace."""
    result_path = out / "results" / f"{check.name}.json"
    log_path = out / "logs" / f"{check.name}.log"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", check.name]
    cmd += ["--ctx", str(ctx_path), "--result", str(result_path), "--budget", f"{budget:.1f}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    killed = False
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=budget + GRACE_S)
        except subprocess.TimeoutExpired:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)  # the child's whole session: torchrun and its workers too
            proc.wait()
    seconds = time.monotonic() - start
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = empty_result(check, "error", f"no result (exit {proc.returncode}): {_tail(log_path)}")
    if killed:
        result["status"] = "timeout"
        result["reason"] = f"killed after {seconds:.0f} s (budget {budget:.0f} s); numbers so far kept"
    elif result["status"] not in STATUSES:
        result["status"] = "error"
    result["seconds"] = round(seconds, 1)
    result["budget_s"] = round(budget, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benches/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, nargs="?", help="folder for gpu_check.json, gpu_check.md and logs/")
    p.add_argument(
        "--cpu", action="store_true", help="toy sizes on the CPU (CI); GPU-only parts not applicable"
    )
    p.add_argument("--quick", action="store_true", help="fewer steps, worker counts and rounds")
    p.add_argument("--only", default="", help=f"comma-separated checks to run, of: {','.join(BY_NAME)}")
    p.add_argument("--total-s", type=float, default=460.0, help="budget of the whole run (s)")
    p.add_argument(
        "--data", type=Path, default=None, help="demo data folder (default: a temp folder, reused)"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ctx", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    p.add_argument("--dist-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.dist_worker:  # a torchrun worker of the "dist" check
        import gpu_check_impl

        return gpu_check_impl.dist_worker(*a.dist_worker)
    if a.child:
        import gpu_check_impl

        return gpu_check_impl.run_child(a.child, a.ctx, a.result, a.budget)
    if a.out is None:
        p.error("OUT is required")

    only = [n for n in a.only.split(",") if n]
    unknown = [n for n in only if n not in BY_NAME]
    if unknown:
        p.error(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    t_run = time.monotonic()
    mode = "cpu" if a.cpu else "gpu"
    if not a.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible; use --cpu for the CPU mode", file=sys.stderr)
            return 2
    out: Path = a.out.resolve()
    for sub in ("results", "logs", "work"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    s = sizes(a.cpu, a.quick)
    data = (a.data or Path(tempfile.gettempdir()) / f"pixpro-gpu-check-data-{mode}").resolve()
    from pixpro.demo_data import generate_demo_dataset

    t = time.monotonic()
    generate_demo_dataset(data, num_images=s["images"], image_size=s["image_size"], seed=0)
    data_s = time.monotonic() - t
    print(f"gpu_check: demo data in {data} ({data_s:.1f} s)", flush=True)

    record_path = out / RECORD
    previous: dict[str, Any] = {}
    if only and record_path.exists():
        previous = json.loads(record_path.read_text())
        if previous.get("mode") != mode:
            previous = {}
    results: dict[str, dict[str, Any]] = {c["name"]: c for c in previous.get("checks", [])}
    ctx = {
        "mode": mode,
        "quick": a.quick,
        "sizes": s,
        "data": str(data / "images"),
        "work": str(out / "work"),
    }
    ctx_path = out / "work" / "ctx.json"
    selected = [c for c in CHECKS if not only or c.name in only]
    for i, check in enumerate(selected):
        if a.cpu and check.gpu_only:
            results[check.name] = empty_result(check, "not applicable", check.gpu_only)
            continue
        budget = check.cpu_s if a.cpu else check.gpu_s
        left = a.total_s - (time.monotonic() - t_run) - GRACE_S
        reserve = sum(
            min(20.0, c.cpu_s if a.cpu else c.gpu_s) for c in selected[i + 1 :] if not (a.cpu and c.gpu_only)
        )
        budget = min(budget, left - reserve)
        if budget < 5:
            results[check.name] = empty_result(
                check, "timeout", f"not started: the run's {a.total_s:.0f} s were spent"
            )
            continue
        ctx["results"] = results
        ctx_path.write_text(json.dumps(ctx))
        print(f"gpu_check: {check.name} (budget {budget:.0f} s) ...", end=" ", flush=True)
        results[check.name] = res = run_check(check, budget, ctx_path, out)
        print(
            f"{res['status']} in {res['seconds']:.0f} s  {res['summary']} {res['reason']}".rstrip(),
            flush=True,
        )

    ordered = [results[c.name] for c in CHECKS if c.name in results]
    record = {
        "schema": SCHEMA,
        "mode": mode,
        "quick": a.quick,
        "started": previous.get("started") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.monotonic() - t_run + (previous.get("seconds", 0.0) if previous else 0.0), 1),
        "total_budget_s": a.total_s,
        "data": {
            "folder": str(data),
            "images": s["images"],
            "image_size": s["image_size"],
            "seconds": round(data_s, 1),
        },
        "sizes": s,
        "goals": {"img_per_s_per_gpu": 1500, "step_over_floor": 1.10},
        "checks": ordered,
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    (out / TABLE).write_text(markdown(record))
    print(markdown(record))
    bad = [c["name"] for c in ordered if c["status"] in ("fail", "error", "timeout")]
    print(
        f"gpu_check: {len(ordered) - len(bad)}/{len(ordered)} checks pass or do not apply; "
        f"record in {record_path}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(HERE)]  # pixpro/launch/schemas and gpu_check_impl, from any folder
    sys.exit(main())
