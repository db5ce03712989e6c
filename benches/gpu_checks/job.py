"""The "job" check: the trainer exactly as a SLURM node runs it, stopped and resumed.

``python -m launch.run --nnodes 1 --nproc-per-node=N --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0
--max-restarts=0 -- SPEC --run-dir DIR``, N every visible GPU (a process group of one still runs every
collective), N = 2 gloo ranks on CPU. Run A goes to the end; run B stops at step k
(``PIXPRO_STOP_AT_STEP``: the ranks agree, commit and ``launch.run`` exits 75), then resumes to the end.
Both final checkpoints must be bitwise equal: the spec asks for deterministic kernels, and a CPU run is
deterministic anyway. Every differing leaf is reported with its max abs difference; when some differ
and time is left, a second uninterrupted run tells run-to-run nondeterminism from a resume bug.

Inside the ranks, ``observe/sitecustomize.py`` counts the ``torch.distributed`` calls per group (the
control plane's are on its gloo group) and records the default group's backends (NCCL for CUDA
tensors on a GPU); NCCL's own log (``NCCL_DEBUG=INFO``) shows its communicators coming up.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gpu_checks.common import REPO, CheckTimeout, Ctx, Deadline, count_leaves, diff_states, spec_dict
from gpu_checks.record import Rec
from gpu_checks.runner import kill_tree

OBSERVE = Path(__file__).resolve().parent / "observe"
EXIT_PREEMPTED = 75  # launch.preempt.EXIT_PREEMPTED, schemas.contract.Exit
_NCCL_UP = re.compile(r"NCCL INFO .*Init COMPLETE")
_TOP = 20  # differing leaves listed in the record


def job_spec(ctx: Ctx, ranks: int) -> dict[str, Any]:
    """The recipe's shape at the check's sizes: bf16, channels_last, LARS, deterministic, checkpoints
    every few steps, on the demo dataset the run generates (here: finds already generated)."""
    s = ctx.s
    batch = s["job_batch"] if ctx.cpu else max(2, min(s["job_batch"], s["images"] // (2 * ranks)))
    return spec_dict(
        ctx,
        name="gpu-check-job",
        data__root=str(ctx.data_root),
        data__demo={"num_images": s["images"], "image_size": s["image_size"], "seed": 0},
        data__batch_size=batch,
        data__num_workers=s["job_workers"],
        data__augment_on="worker" if ctx.cpu else "device",
        optim__optimizer="lars",
        optim__max_steps=s["job_steps"],
        deterministic=True,
        checkpoint__every_steps=s["job_every"],
        checkpoint__keep_last=3,
        log_every_steps=2,
    )


def launch_cmd(spec: Path, run_dir: Path, ranks: int) -> list[str]:
    return [
        sys.executable, "-m", "launch.run", "--nnodes", "1", f"--nproc-per-node={ranks}",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts=0",
        "--", str(spec), "--run-dir", str(run_dir),
    ]  # fmt: skip


def launch_env(ctx: Ctx, observed: Path, **extra: str) -> dict[str, str]:
    """A node's environment: nothing of an enclosing job or run (PIXPRO_, SLURM_, TORCHELASTIC_). The
    PYTHONPATH it had stays behind the observer and the repository: on a lent GPU machine it holds the
    carried wheels (benches/gpu_check.sh)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXPRO_", "SLURM_", "TORCHELASTIC_"))}
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(OBSERVE), str(REPO), *inherited])
    env["GPU_CHECK_COLLECTIVES"] = str(observed)
    if ctx.cpu:
        env["OMP_NUM_THREADS"] = str(ctx.s["threads"] or 1)
    else:
        env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT")
    env.update(extra)
    return env


def final_state(run_dir: Path) -> dict[str, Any]:
    """Every file of the newest committed checkpoint, loaded (weights only), and its step."""
    from launch.store import CheckpointStore

    store = CheckpointStore(str(run_dir / "checkpoints"))
    manifest = store.resolve()
    if manifest is None:
        raise RuntimeError(f"no committed checkpoint in {run_dir}")
    files = {n: torch.load(io.BytesIO(store.read(manifest, n)), weights_only=True) for n in manifest.names}
    return files | {"__step__": manifest.step}


class Runs:
    """The check's launches, each with its log, wall time and what its ranks reported."""

    def __init__(self, ctx: Ctx, dl: Deadline, root: Path, spec: Path, ranks: int) -> None:
        self.ctx, self.dl, self.root, self.spec, self.ranks = ctx, dl, root, spec, ranks
        self.walls: dict[str, float] = {}
        self.codes: dict[str, int | None] = {}

    def launch(self, name: str, run: str, **env: str) -> tuple[int, str]:
        observed = self.root / "collectives" / name
        observed.mkdir(parents=True)
        log = self.root / f"{name}.log"
        cmd = launch_cmd(self.spec, self.root / run, self.ranks)
        t = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=launch_env(self.ctx, observed, **env), stdout=out, stderr=subprocess.STDOUT
            )
            try:
                code = proc.wait(timeout=max(self.dl.left(), 1))
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)  # the agent and its ranks, which live in sessions of their own
                proc.wait()
                self.walls[name] = round(time.monotonic() - t, 1)
                raise CheckTimeout(f"run {name} still running at the deadline") from None
        self.walls[name] = round(time.monotonic() - t, 1)
        self.codes[name] = code
        text = log.read_text(errors="replace")
        print(f"--- {name}: exit {code} in {self.walls[name]} s\n{text[-4000:]}", flush=True)
        return code, text

    def observed(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.root / "collectives" / name).glob("*.json"))]


def plane_counts(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rank: control-plane calls (gloo groups other than the default) and default-group calls."""
    control, default = [], []
    for r in ranks:
        gloo = {g for g, backend in r["groups"].items() if g != "default" and "nccl" not in backend}
        calls = r["calls"]
        control.append(sum(n for k, n in calls.items() if k.split("@")[1].split("[")[0] in gloo))
        default.append(sum(n for k, n in calls.items() if k.split("@")[1].startswith("default")))
    return {
        "ranks_reporting": len(ranks),
        "default_backend": sorted({r.get("default_backend", "?") for r in ranks}),
        "groups": ranks[0]["groups"] if ranks else {},
        "control_calls_per_rank": control,
        "default_group_calls_per_rank": default,
        "calls_rank0": dict(ranks[0]["calls"]) if ranks else {},
    }


def _failure(text: str) -> str:
    """The root cause in a failed launch's log: the first exception a rank raised (torchrun's own
    ChildFailedError summary comes after it), else a ``pixpro:`` line, else the last line."""
    raised = [
        m.group(0)
        for m in re.finditer(r"\b\w+(?:Error|Exception): .+", text)
        if "ChildFailed" not in m.group(0)
    ]
    ours = [ln for ln in text.splitlines() if "pixpro:" in ln or " ERROR " in ln]
    lines = raised[:1] or ours[-1:] or text.strip().splitlines()[-1:] or ["no output"]
    return lines[0][-300:]


def check_job(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    ranks = ctx.s["job_ranks"] or torch.cuda.device_count()
    steps, stop = ctx.s["job_steps"], ctx.s["job_stop"]
    root = ctx.work / "job"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    spec = job_spec(ctx, ranks)
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    rec.set(
        ranks=ranks,
        backend="gloo" if ctx.cpu else "nccl",
        steps=steps,
        stop_at=stop,
        spec={k: spec[k] for k in ("data", "model", "optim", "precision", "channels_last", "deterministic")},
        trains_in="fp32 (the spec's bf16 applies on GPU or with cpu_autocast)"
        if ctx.cpu
        else "bf16, channels_last",
    )
    try:
        return _stop_resume_compare(ctx, rec, dl, Runs(ctx, dl, root, spec_path, ranks))
    finally:  # the checkpoints are GBs on a GPU: the logs and the record say what happened
        for run in ("a", "b", "c"):
            shutil.rmtree(root / run / "checkpoints", ignore_errors=True)


def _stop_resume_compare(ctx: Ctx, rec: Rec, dl: Deadline, runs: Runs) -> tuple[str, str]:
    root, ranks = runs.root, runs.ranks
    steps, stop = ctx.s["job_steps"], ctx.s["job_stop"]
    expected = {"A": 0, "B_stop": EXIT_PREEMPTED, "B_resume": 0}
    logs: dict[str, str] = {}
    stopped: int | None = None
    for name, run, env in (
        ("A", "a", {}),
        ("B_stop", "b", {"PIXPRO_STOP_AT_STEP": str(stop)}),
        ("B_resume", "b", {}),
    ):
        code, logs[name] = runs.launch(name, run, **env)
        rec.set(exit_codes=dict(runs.codes), wall_s=dict(runs.walls))
        if code != expected[name]:
            return "fail", f"run {name} exit {code} (expected {expected[name]}): {_failure(logs[name])}"
        if name == "B_stop":
            stopped = final_state(root / "b")["__step__"]
    resumed = f"resumed from step {stop}" in logs["B_resume"]
    planes = plane_counts(runs.observed("A"))
    nccl_up = [len(_NCCL_UP.findall(logs[n])) for n in ("A", "B_resume")]
    rec.set(committed_at_stop=stopped, resumed_in_log=resumed, collectives=planes)
    if not ctx.cpu:
        rec.set(nccl_init_lines=nccl_up)

    a, b = final_state(root / "a"), final_state(root / "b")
    diffs = diff_states(a, b)
    worst = sorted(diffs, key=lambda d: -d[1])
    rec.set(
        final_steps=[a["__step__"], b["__step__"]],
        leaves_compared=count_leaves(a),
        leaves_differing=len(diffs),
        max_abs_diff=worst[0][1] if worst else 0.0,
        max_abs_diff_by_file={
            f: max((d for p, d in diffs if p.startswith(f"state.{f}")), default=0.0)
            for f in a
            if f != "__step__"
        },
        max_abs_diff_by_leaf=dict(worst[:_TOP]),
        cuda_rng_states_per_rank=None if ctx.cpu else len(b["rank0.pt"]["rng"]["cuda"]),
    )
    verdict = "bitwise identical"
    if diffs:
        verdict = f"{len(diffs)} of {count_leaves(a)} leaves differ (max {worst[0][1]:.2e} at {worst[0][0]})"
        if dl.left() > runs.walls["A"] * 1.2:
            runs.launch("C", "c")
            run_to_run = diff_states(a, final_state(root / "c"))
            rec.set(
                run_to_run_differing=len(run_to_run),
                run_to_run_max=max((d[1] for d in run_to_run), default=0),
            )
            verdict += "; an uninterrupted rerun " + (
                "differs too: run-to-run nondeterminism" if run_to_run else "is identical: the resume differs"
            )
    rec.summary(
        f"{ranks} x {'gloo CPU' if ctx.cpu else 'GPU'} ranks, {steps} steps: A {runs.walls['A']:.0f} s; "
        f"B stopped at {stopped} ({runs.walls['B_stop']:.0f} s), resumed ({runs.walls['B_resume']:.0f} s): "
        f"{verdict}; control plane {planes['control_calls_per_rank']} calls/rank on "
        f"{', '.join(v for k, v in planes['groups'].items() if k != 'default')}, default group "
        f"{', '.join(planes['default_backend'])}"
        + (f", NCCL up {nccl_up}" if not ctx.cpu else "")
        + (
            "; one rank: no gradient reduction or SyncBatchNorm across GPUs was exercised"
            if ranks == 1
            else ""
        )
    )
    problems = []
    if stopped != stop or not resumed:
        problems.append(f"B committed step {stopped} and {'logged' if resumed else 'did not log'} its resume")
    if [a["__step__"], b["__step__"]] != [steps, steps]:
        problems.append(f"final steps {a['__step__']}/{b['__step__']}, expected {steps}")
    if planes["ranks_reporting"] != ranks or min(planes["control_calls_per_rank"], default=0) == 0:
        problems.append(
            f"control-plane collectives not seen on every rank: {planes['control_calls_per_rank']}"
        )
    if not ctx.cpu and not all("cuda:nccl" in backend for backend in planes["default_backend"]):
        problems.append(f"default group {planes['default_backend']}, not NCCL for CUDA tensors")
    if not ctx.cpu and rec.numbers["cuda_rng_states_per_rank"] != 1:
        problems.append(f"{rec.numbers['cuda_rng_states_per_rank']} CUDA RNG states per rank (expected 1)")
    if diffs:
        problems.append(verdict)
    return ("fail", "; ".join(problems)) if problems else ("pass", "")
