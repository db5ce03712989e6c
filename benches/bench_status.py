"""How long ``pixpro status`` takes on a login node, by the number of runs in the registry.

Runs are made as the trainer and the runner leave them (``tests/support/runs.py``: checkpoints, status
and metrics records; every fifth run a SLURM job id), in a temporary ``PIXPRO_HOME``. Each row is the
median wall time of the installed console script, so Python's start-up is included: what a user waits.
SLURM is asked when ``sacct``/``squeue`` are on PATH (``. /var/lib/pixpro-slurm/env.sh`` for the local
cluster); the table says whether they answered.

    python benches/bench_status.py [--runs 10 50 200] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.runs import fake_runs  # noqa: E402

PIXPRO = str(Path(sys.executable).with_name("pixpro"))


def timed(args: list[str], home: Path, reps: int) -> tuple[float, str]:
    env = {**os.environ, "PIXPRO_HOME": str(home)}
    times, stderr = [], ""
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.run([PIXPRO, *args], capture_output=True, text=True, env=env, timeout=300)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"pixpro {' '.join(args)} failed: {proc.stderr.strip()}")
        stderr = proc.stderr
    return statistics.median(times), stderr


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    slurm = shutil.which("sacct") is not None and shutil.which("squeue") is not None
    rows = []
    for n in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp) / "home"
            fake_runs(home, n)
            table, stderr = timed(["status"], home, args.reps)
            as_json, _ = timed(["status", "--json"], home, args.reps)
            warned = "failed" in stderr or "did not answer" in stderr
            rows.append((n, table, as_json, "no" if not slurm else ("asked, failed" if warned else "asked")))
    print(f"\npixpro status, median of {args.reps} (wall time of the console script, start-up included)")
    print(f"{'runs':>6s} {'table s':>9s} {'--json s':>9s}  SLURM")
    for n, table, as_json, slurm_note in rows:
        print(f"{n:6d} {table:9.3f} {as_json:9.3f}  {slurm_note}")


if __name__ == "__main__":
    main()
