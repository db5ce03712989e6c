"""How long the ``pixpro`` commands a user types most take to answer, start-up included.

Each row times the installed console script in fresh processes, after one warm-up run that also writes
the byte-code caches an installed package has: the median and the fastest wall time, and the median CPU
time (user + system, children included), which the other jobs of a shared machine disturb less. Goals:
``pixpro validate`` of the ImageNet example spec within 0.15 s, ``pixpro status`` of 50 runs within
0.3 s. ``python -c pass`` is the floor no command can go under; the ``import`` rows are the floors of
the libraries each command needs (pydantic and the spec models; rich and the contract's records) and
Typer's, which the console script skips for these two (:mod:`cluster.entry`). ``status`` asks SLURM
when ``squeue``/``sacct`` are on PATH (``. /var/lib/pixpro-slurm/env.sh`` for the local cluster).
``--imports`` also lists, per command, the modules that cost the most (``python -X importtime``).

    python benches/bench_cli.py [--reps 21] [--runs 50] [--imports]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
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
SPEC = REPO / "launch" / "specs" / "imagenet_r50_100ep.json"
GOALS = {"validate": 0.15, "status": 0.3}
FLOOR_TYPER = "import typer.main"  # what every other command pays to start
FLOOR_VALIDATE = (  # the spec models, plugin loader skipped (as validate): it cannot start under this
    "import os; os.environ.setdefault('PYDANTIC_DISABLE_PLUGINS', '1');"
    " from cluster.entry import skip_plugin_loader; skip_plugin_loader(); import schemas.spec.load"
)
FLOOR_STATUS = "import rich.console, rich.table, schemas.contract"  # what status needs to start


def stale_script() -> str | None:
    """Why the installed console script is not the one pyproject.toml declares (None: it is): a venv
    installed before the entry point moved times the old one (``make venv`` reinstalls)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    declared = re.search(r'^\[project\.scripts\]\npixpro = "([^"]+)"', pyproject, re.MULTILINE)
    found = re.search(r"^from (\S+) import (\S+)$", Path(PIXPRO).read_text(), re.MULTILINE)
    installed = f"{found.group(1)}:{found.group(2)}" if found else "?"
    wanted = declared.group(1) if declared else "?"
    return None if installed == wanted else f"{PIXPRO} calls {installed}, pyproject.toml declares {wanted}"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str], reps: int) -> tuple[float, float, float]:
    """Median and fastest wall seconds and median CPU seconds of ``cmd`` over ``reps`` runs, after one
    warm-up run."""
    subprocess.run(cmd, env=env, capture_output=True, check=True, timeout=300)
    walls, cpus = [], []
    for _ in range(reps):
        cpu0, t0 = _children_cpu(), time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        walls.append(time.perf_counter() - t0)
        cpus.append(_children_cpu() - cpu0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return statistics.median(walls), min(walls), statistics.median(cpus)


def heaviest_imports(args: list[str], env: dict[str, str], top: int = 8) -> list[tuple[str, float]]:
    """Top-level packages by cumulative import time (ms) in one run of ``python -X importtime``."""
    cmd = [sys.executable, "-X", "importtime", PIXPRO, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    costs: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        if not name.startswith("  "):  # imported directly by the command, not by another module
            costs[name.strip()] = costs.get(name.strip(), 0.0) + int(cumulative) / 1000
    return sorted(costs.items(), key=lambda kv: -kv[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--imports", action="store_true")
    args = parser.parse_args()
    stale = stale_script()
    if stale:
        print(f"warning: {stale}: reinstall (make venv) to time this tree's console script")
    slurm = shutil.which("sacct") is not None and shutil.which("squeue") is not None
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        fake_runs(home, args.runs)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PIXPRO_HOME"] = str(home)
        commands = {
            "python -c pass": ([sys.executable, "-c", "pass"], None),
            "python: import typer.main": ([sys.executable, "-c", FLOOR_TYPER], None),
            "python: import schemas.spec.load": ([sys.executable, "-c", FLOOR_VALIDATE], None),
            "python: import rich, schemas.contract": ([sys.executable, "-c", FLOOR_STATUS], None),
            f"pixpro validate {SPEC.name}": ([PIXPRO, "validate", str(SPEC)], "validate"),
            f"pixpro status ({args.runs} runs)": ([PIXPRO, "status"], "status"),
            f"pixpro status --json ({args.runs} runs)": ([PIXPRO, "status", "--json"], "status"),
            "pixpro --help": ([PIXPRO, "--help"], None),
        }
        rows = [(label, goal, *timed(cmd, env, args.reps)) for label, (cmd, goal) in commands.items()]
        imports = {
            name: heaviest_imports(cli_args, env)
            for name, cli_args in (("validate", ["validate", str(SPEC)]), ("status", ["status"]))
            if args.imports
        }
    print(f"\nmedian of {args.reps} fresh processes; SLURM asked by status: {'yes' if slurm else 'no'}")
    print(f"{'command':46s} {'wall s':>8s} {'fastest':>8s} {'CPU s':>8s}  goal")
    for label, goal, wall, fastest, cpu in rows:
        target = f"<= {GOALS[goal]:g} s" if goal else ""
        print(f"{label:46s} {wall:8.3f} {fastest:8.3f} {cpu:8.3f}  {target}")
    for name, costs in imports.items():
        print(f"\nheaviest imports of pixpro {name} (cumulative ms, one run):")
        for module, ms in costs:
            print(f"  {module:40s} {ms:7.1f}")


if __name__ == "__main__":
    main()
