"""Run every benchmark in turn and print their tables (copy the results into benches/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "bench_step.py",
    "bench_lars.py",
    "bench_checkpoint.py",
    "bench_probe.py",
    "bench_status.py",
    "bench_cli.py",
    "bench_startup.py",
    "bench_s3.py",
    "bench_deadlines.py",
]

if __name__ == "__main__":
    for name in BENCHES:
        if (HERE / name).exists():
            print(f"\n## {name}\n", flush=True)
            subprocess.run([sys.executable, str(HERE / name), *sys.argv[1:]], check=True, cwd=HERE.parent)
