"""GPU acceptance check: prove pixpro's CUDA path in minutes, on the first GPU that is lent.

    python benches/gpu_check.py OUT [--cpu] [--quick] [--only NAME[,NAME]] [--total-s S]
    make gpu-check OUT=dir

Every path that only a GPU executes (NCCL, bf16/fp16 autocast with GradScaler, channels_last,
SyncBatchNorm's fused kernels, host syncs, CUDA RNG and deterministic kernels in a resume, pinned host
copies, the checkpoint copy from device memory, torch.compile) gets a check, and the "job" check runs the
trainer exactly as a SLURM node does (``launch.run``, every visible GPU, stopped and resumed). Each
check runs in its own process under its own budget (forked from this one once it imported torch and
the trainer, without initializing CUDA), so a hung kernel, a CUDA error or a slow compile costs that
check only: it is recorded as ``timeout``/``error`` and the run goes on. The budgets add up
to at most the total (``gpu_checks.plan``), 7.5 minutes on a GPU.

Results: ``OUT/gpu_check.json`` (the record; ``--only`` merges into an existing one, so a failed check
is cheap to rerun) and ``OUT/gpu_check.md`` (the table for benches/RESULTS.md); each check's output is
kept in ``OUT/logs/``. Exit status 1 when any check failed, erred or timed out (the record is written
either way), 2 when no GPU is visible without ``--cpu``.

``--cpu`` runs every check at toy sizes on the CPU (gloo instead of NCCL), so the script cannot rot
between GPU loans; GPU-only parts say "not applicable on CPU". Nothing is downloaded: the network is
built from scratch and the data is generated (pixpro.demo_data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [p for p in (str(HERE), str(REPO)) if p not in sys.path]  # gpu_checks, pixpro, launch

from gpu_checks.plan import BY_NAME, CHECKS, GOALS, TOTAL_S, sizes  # noqa: E402
from gpu_checks.record import RECORD, SCHEMA, TABLE, markdown, previous_record  # noqa: E402
from gpu_checks.runner import run_all  # noqa: E402

from launch import forking  # noqa: E402


def _setup(data: Path, s: dict[str, Any]) -> float:
    """The demo data every check reads, and the loader workers' compiled photometric kernels in numba's
    disk cache (compiled once here, not in the first check that builds a trainer)."""
    from pixpro import photometric_cpu
    from pixpro.demo_data import generate_demo_dataset

    t = time.monotonic()
    generate_demo_dataset(data, num_images=s["images"], image_size=s["image_size"], seed=0)
    photometric_cpu.precompile()
    return time.monotonic() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benches/gpu_check.py", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and logs/")
    p.add_argument(
        "--cpu", action="store_true", help="toy sizes on the CPU (CI); GPU-only parts not applicable"
    )
    p.add_argument("--quick", action="store_true", help="fewer steps, worker counts and rounds")
    p.add_argument("--only", default="", help=f"comma-separated checks to run, of: {','.join(BY_NAME)}")
    p.add_argument(
        "--total-s",
        type=float,
        default=None,
        help=f"budget of the whole run (s; default {TOTAL_S['gpu']:.0f} GPU, {TOTAL_S['cpu']:.0f} CPU)",
    )
    p.add_argument(
        "--data", type=Path, default=None, help="demo data folder (default: a temp folder, reused)"
    )
    a = p.parse_args(argv)

    only = [n for n in a.only.split(",") if n]
    unknown = [n for n in only if n not in BY_NAME]
    if unknown:
        p.error(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    t_run = time.monotonic()
    mode = "cpu" if a.cpu else "gpu"
    total_s = a.total_s or TOTAL_S[mode]
    forking.spare_device_checks()  # this process's CUDA checks must not keep it from forking the checks
    if a.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # as in every check (gpu_checks.runner.child_env)
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible; use --cpu for the CPU mode", file=sys.stderr)
            return 2
    out: Path = a.out.resolve()
    for sub in ("results", "logs", "work"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    s = sizes(a.cpu, a.quick)
    data = (a.data or Path(tempfile.gettempdir()) / f"pixpro-gpu-check-data-{mode}").resolve()
    setup_s = _setup(data, s)
    print(f"gpu_check: demo data in {data}, worker kernels compiled ({setup_s:.1f} s)", flush=True)

    record_path = out / RECORD
    previous = previous_record(record_path, mode) if only else {}
    results: dict[str, dict[str, Any]] = {c["name"]: c for c in previous.get("checks", [])}
    ctx = {"mode": mode, "quick": a.quick, "sizes": s, "data": str(data), "work": str(out / "work")}
    selected = [c for c in CHECKS if not only or c.name in only]
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": mode,
        "quick": a.quick,
        "started": previous.get("started") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": 0.0,
        "total_budget_s": total_s,
        "data": {
            "folder": str(data),
            "images": s["images"],
            "image_size": s["image_size"],
            "setup_seconds": round(setup_s, 1),
        },
        "sizes": s,
        "goals": GOALS,
        "checks": [],
    }

    def write() -> None:
        record["seconds"] = round(time.monotonic() - t_run + previous.get("seconds", 0.0), 1)
        record["checks"] = [results[c.name] for c in CHECKS if c.name in results]
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        (out / TABLE).write_text(markdown(record))

    run_all(selected, mode, total_s, t_run, ctx, out, results, on_result=write)
    write()
    ordered = record["checks"]
    print(markdown(record))
    bad = [c["name"] for c in ordered if c["status"] in ("fail", "error", "timeout")]
    print(
        f"gpu_check: {len(ordered) - len(bad)}/{len(ordered)} checks pass or do not apply; "
        f"record in {record_path}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
