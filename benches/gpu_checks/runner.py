"""Each check in a child process of its own, killed with every process it started past its budget.

A hung kernel, a CUDA error or a slow compile then costs that check only: it is recorded as
``timeout``/``error`` and the run goes on. Trainers started by ``launch.run`` live in sessions of their
own, so a kill of the child's session alone would leave them running: the whole tree goes.

The children are forked (:func:`launch.forking.fork_call`, as the node agent starts its ranks) from this
process once it imported torch, torchvision, ``torch._dynamo`` and the trainer (:data:`PRELOAD`), which
never initializes CUDA: each check starts in a fraction of a second instead of paying 3-4 CPU-seconds of
imports. Where fork is not safe (:func:`launch.forking.enabled`) or ``PIXPRO_FORK=0``, each check is a
fresh interpreter as before.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_checks import child
from gpu_checks.plan import MIN_BUDGET_S, REPO, CheckDef
from gpu_checks.record import STATUSES, UNFINISHED, empty_result
from launch import forking

BENCHES = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "torchvision.transforms.v2", "torch._dynamo", "launch.train", "gpu_checks.common")
"""What every check imports, once in the runner before it forks them."""


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant (collected first: once their parent is
    gone they are re-parented and cannot be found)."""
    victims = descendants(pid)
    for target in (pid, *victims):
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, chars: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    last = [line for line in text.splitlines() if line.strip()][-1:] or [""]
    return last[0][-chars:]


def child_env(mode: str) -> dict[str, str]:
    """The checks import ``gpu_checks`` and the repository's packages; ``--cpu`` hides every GPU; the
    device check's setting for this process (:func:`launch.forking.spare_device_checks`) is not theirs."""
    path = os.pathsep.join(p for p in (str(REPO), str(BENCHES), os.environ.get("PYTHONPATH", "")) if p)
    env = forking.worker_env({**os.environ, "PYTHONPATH": path})
    if mode == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def preload() -> bool:
    """Import :data:`PRELOAD` here when the checks can be forked from this process; whether they can."""
    if not forking.enabled():
        return False
    for name in PRELOAD:
        importlib.import_module(name)
    return forking.enabled()  # still: nothing above initialized CUDA


def _start(
    args: list[str], env: dict[str, str], log: Any, fork: bool
) -> subprocess.Popen | forking.ForkedProcess:
    """``python -m gpu_checks.child ARGS`` in a session of its own: forked (see the module doc) or a
    fresh interpreter."""
    cmd = [sys.executable, "-m", "gpu_checks.child", *args]
    if not fork:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def target() -> None:
        os.chdir(REPO)
        child.exit_now(child.main(args))

    return forking.fork_call(
        target, cmd, argv=[child.__file__, *args], env=env, stdout=log, stderr=log, new_session=True
    )


def run_check(
    check: CheckDef, budget: float, ctx_path: Path, out: Path, mode: str, fork: bool = False
) -> dict[str, Any]:
    """Run one check in a child process of its own session; kill its tree at ``budget`` seconds."""
    result_path = out / "results" / f"{check.name}.json"
    log_path = out / "logs" / f"{check.name}.log"
    result_path.unlink(missing_ok=True)
    args = [check.name, str(ctx_path), str(result_path), f"{budget:.1f}"]
    start = time.monotonic()
    killed = False
    with log_path.open("w") as log:
        proc = _start(args, child_env(mode), log, fork)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            killed = True
            kill_tree(proc.pid)
            proc.wait()
    seconds = time.monotonic() - start
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        reason = f"no result (exit {proc.returncode}): {_tail(log_path)}"
        result = empty_result(check.name, check.title, "error", reason)
    if killed and result["status"] == "error" and result["reason"] == UNFINISHED:
        result["status"] = "timeout"
        result["reason"] = f"killed after {seconds:.0f} s (budget {budget:.0f} s); numbers so far kept"
    elif killed:  # its verdict was written; only the process's exit ran past the budget
        result["reason"] = "; ".join(r for r in (result["reason"], "killed at its budget while exiting") if r)
    elif result["status"] not in STATUSES:
        result["status"] = "error"
    result["seconds"] = round(seconds, 1)
    result["budget_s"] = round(budget, 1)
    return result


def run_all(
    selected: list[CheckDef],
    mode: str,
    total_s: float,
    t_run: float,
    ctx: dict[str, Any],
    out: Path,
    results: dict[str, dict[str, Any]],
    on_result: Callable[[], None] = lambda: None,
) -> None:
    """Run ``selected`` in order into ``results``, calling ``on_result`` after each (the record grows as
    the run goes: a machine taken back mid-run leaves the checks done so far).

    Each check gets its own budget, scaled down when what is left of ``total_s`` (counted from
    ``t_run``) no longer covers the budgets still to run, so a late check is never starved by an early
    one; time saved by checks that finish early is not handed on (a budget is a bound, not an allowance).
    """
    ctx_path = out / "work" / "ctx.json"
    runnable = [c for c in selected if not (mode == "cpu" and c.gpu_only)]
    fork = bool(runnable) and preload()
    for check in selected:
        if mode == "cpu" and check.gpu_only:
            results[check.name] = empty_result(check.name, check.title, "not applicable", check.gpu_only)
            continue
        ahead = runnable[runnable.index(check) :]
        left = total_s - (time.monotonic() - t_run)
        scale = min(1.0, left / sum(c.budget(mode) for c in ahead))
        budget = check.budget(mode) * scale
        if budget < MIN_BUDGET_S:
            reason = f"not started: the run's {total_s:.0f} s were spent"
            results[check.name] = empty_result(check.name, check.title, "timeout", reason)
            continue
        ctx["results"] = results
        ctx_path.write_text(json.dumps(ctx))
        print(f"gpu_check: {check.name} (budget {budget:.0f} s) ...", end=" ", flush=True)
        results[check.name] = res = run_check(check, budget, ctx_path, out, mode, fork)
        on_result()
        print(
            f"{res['status']} in {res['seconds']:.0f} s  {res['summary']} {res['reason']}".rstrip(),
            flush=True,
        )
