"""What each process of a run costs to start: the imports of the node agent, a rank, a rank's uploader
and the evaluation tools, in fresh processes, byte-code cached.

A launch of one node with N ranks starts 1 + 2N such processes (the agent, and per rank the trainer and
its uploader), and so does every restart after a killed or hung rank; the end-to-end tests start
hundreds. The rows are the floors under each (what ``python -m launch.train`` pays before it reads its
spec), with the libraries that make them up: ``torch`` alone, ``torchvision`` on top (which imports
``torch._dynamo`` through ``torchvision.ops``, and transforms v2 again), the same without it as the
preflight imports it (:mod:`launch.light_imports`), and numba's compiled photometric steps, loaded from their
on-disk cache. Median and fastest wall time and median CPU time (user + system) of ``--reps`` runs after
one warm-up run.

Then whole launches, which is what those floors add up to: one node, two ranks under ``launch.run``, a
two-step squeezenet1_1 run at 64 px (its final checkpoint committed), with the ranks and their uploaders
forked from the agent's imported state (the default, :mod:`launch.forking`) against fresh interpreters
(``PIXPRO_FORK=0``), interleaved; wall time and the CPU time of the whole process tree.

And one cost inside the agent: the rendezvous names the method behind each of its state changes, torch
with ``inspect.stack()`` (the source and module of every frame), :func:`launch.elastic.caller_name` off
the frame; CPU per call, 20 frames deep, in a process that imported the trainer as the agent does.

    python benches/bench_startup.py [--reps 7] [--launch-reps 5]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_cli import _children_cpu, timed  # noqa: E402

ROWS = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "import torch, torchvision": "import torch, torchvision",
    "import torch._dynamo (without torchvision)": "import torch, torch._dynamo",
    "import torchvision.transforms.v2": "import torchvision.transforms.v2",
    "the same, no torch._dynamo (launch.light_imports)": (
        "from launch.light_imports import import_torchvision; import_torchvision()"
    ),
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


def launch_spec(work: Path) -> Path:
    spec = {
        "name": "startup",
        "seed": 3,
        "data": {
            "root": str(work / "data"),
            "demo": {"num_images": 16, "image_size": 72, "seed": 1},
            "crop_size": 64,
            "batch_size": 4,
            "num_workers": 0,
        },
        "model": {"backbone": "squeezenet1_1", "projector_hidden": 64, "projector_out": 32},
        "optim": {"epochs": 1, "warmup_epochs": 0.5, "max_steps": 2, "base_lr": 1.0},
        "precision": "fp32",
        "threads": 1,
        "checkpoint": {"every_steps": 100, "every_minutes": None},
    }
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def launch_once(spec: Path, run_dir: Path, fork: bool) -> tuple[float, float]:
    """Wall and process-tree CPU seconds of one two-rank launch to its committed end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXPRO_", "SLURM_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1", PIXPRO_FORK="1" if fork else "0")
    cmd = [sys.executable, "-m", "launch.run", "--nnodes", "1", "--nproc-per-node=2", "--rdzv-backend"]
    cmd += ["c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts=0", "--", str(spec)]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run([*cmd, "--run-dir", str(run_dir)], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"launch failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wall, cpu


def launches(reps: int) -> dict[bool, list[tuple[float, float]]]:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        spec = launch_spec(work)
        launch_once(spec, work / "warm-up", fork=True)  # the demo images, byte code, numba's cache
        out: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for rep in range(reps):
            for fork in (False, True):
                out[fork].append(launch_once(spec, work / f"run-{rep}-{fork}", fork))
        return out


METHOD_NAMES = """
import json, time
import launch.train
from launch.elastic import caller_name
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import get_method_name
def deep(n, fn):
    return deep(n - 1, fn) if n else fn()
out = {}
for label, fn in (("torch", get_method_name), ("ours", caller_name)):
    t0 = time.process_time()
    names = {deep(20, fn) for _ in range(REPS)}
    out[label] = (time.process_time() - t0) / REPS
    assert names == {"deep"}, names
print(json.dumps(out))
"""


def method_names(env: dict[str, str], reps: int) -> dict[str, float]:
    """CPU seconds per rendezvous method-name lookup: torch's and :func:`launch.elastic.caller_name`."""
    code = METHOD_NAMES.replace("REPS", str(reps))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--launch-reps", type=int, default=5)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(HERE.parent)
    rows = [(label, *timed([sys.executable, "-c", code], env, args.reps)) for label, code in ROWS.items()]
    print(f"\nmedian of {args.reps} fresh processes, byte-code cached")
    print(f"{'process floor':48s} {'wall s':>8s} {'fastest':>8s} {'CPU s':>8s}")
    for label, wall, fastest, cpu in rows:
        print(f"{label:48s} {wall:8.3f} {fastest:8.3f} {cpu:8.3f}")
    names = method_names(env, 20)
    print("\nrendezvous method name, CPU per call, 20 frames deep, launch.train imported")
    print(f"{'torch (inspect.stack)':48s} {names['torch']:8.4f}")
    print(f"{'launch.elastic.caller_name':48s} {names['ours']:8.6f}")
    if args.launch_reps:
        runs = launches(args.launch_reps)
        print(f"\none node, two ranks, two steps: median of {args.launch_reps} launches, interleaved")
        print(f"{'ranks and uploaders':48s} {'wall s':>8s} {'fastest':>8s} {'CPU s':>8s}")
        medians = {}
        for fork, label in ((False, "fresh interpreters (PIXPRO_FORK=0)"), (True, "forked from the agent")):
            walls, cpus = [w for w, _ in runs[fork]], [c for _, c in runs[fork]]
            medians[fork] = statistics.median(walls), statistics.median(cpus)
            print(f"{label:48s} {medians[fork][0]:8.3f} {min(walls):8.3f} {medians[fork][1]:8.3f}")
        wall_ratio, cpu_ratio = (medians[True][i] / medians[False][i] for i in (0, 1))
        print(f"{'forked / fresh':48s} {wall_ratio:8.2f} {'':8s} {cpu_ratio:8.2f}")


if __name__ == "__main__":
    main()
