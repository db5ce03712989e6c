"""What each process of a run costs to start: the imports of the node agent, a rank, a rank's uploader
and the evaluation tools, in fresh processes, byte-code cached.

A launch of one node with N ranks starts 1 + 2N such processes (the agent, and per rank the trainer and
its uploader), and so does every restart after a killed or hung rank; the end-to-end tests start
hundreds. The rows are the floors under each (what ``python -m launch.train`` pays before it reads its
spec), with the libraries that make them up: ``torch`` alone, ``torchvision`` on top (which imports
``torch._dynamo`` through ``torchvision.ops``), and numba's compiled photometric steps, loaded from their
on-disk cache. Median and fastest wall time and median CPU time (user + system) of ``--reps`` runs after
one warm-up run.

    python benches/bench_startup.py [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_cli import timed  # noqa: E402

ROWS = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "import torch, torchvision": "import torch, torchvision",
    "import torch._dynamo (without torchvision)": "import torch, torch._dynamo",
    "numba steps, cached (pixpro.photometric_cpu)": (
        "from pixpro import photometric_cpu; photometric_cpu.precompile()"
    ),
    "node agent: import launch.run": "import launch.run",
    "uploader: import launch.uploader": "import launch.uploader",
    "rank: import launch.train": "import launch.train",
    "rank: import launch.train + numba steps": (
        "import launch.train; from pixpro import photometric_cpu; photometric_cpu.precompile()"
    ),
    "tools: import launch.tools.classify": "import launch.tools.classify",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(HERE.parent)
    rows = [(label, *timed([sys.executable, "-c", code], env, args.reps)) for label, code in ROWS.items()]
    print(f"\nmedian of {args.reps} fresh processes, byte-code cached")
    print(f"{'process floor':48s} {'wall s':>8s} {'fastest':>8s} {'CPU s':>8s}")
    for label, wall, fastest, cpu in rows:
        print(f"{label:48s} {wall:8.3f} {fastest:8.3f} {cpu:8.3f}")


if __name__ == "__main__":
    main()
