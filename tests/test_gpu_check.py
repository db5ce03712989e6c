"""benches/gpu_check.py in its CPU mode: every check runs, so the GPU acceptance script cannot rot.

One full ``--cpu`` run (squeezenet1_1: about a minute and a half on 2 idle cores, a third of it the "job"
check's three two-rank launches) feeds the assertions on the record's shape and the CPU results; a
``--only`` rerun checks the merge, and a child killed at its budget checks the timeout path. The rest are
fast: the budget rule, the sync rule against the trainer's source, the state diff, the process-tree kill.
How long each check takes, and how soon after its budget a check is killed, are benches' figures
(benches/RESULTS.md).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.shared import once

REPO = Path(__file__).resolve().parents[1]
BENCHES = REPO / "benches"
SCRIPT = BENCHES / "gpu_check.py"
SHELL = BENCHES / "gpu_check.sh"
NA = "not applicable on CPU"
pytestmark = pytest.mark.xdist_group("gpu_check")  # under xdist one worker runs the --cpu run, once
slow = pytest.mark.slow


def _bench(name: str) -> Any:
    if str(BENCHES) not in sys.path:
        sys.path.insert(0, str(BENCHES))
    return importlib.import_module(name)


def _run(out: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    timeout = _bench("gpu_checks.plan").TOTAL_S["cpu"] + 30  # inside pytest's 600 s
    cmd = [sys.executable, str(SCRIPT), str(out), "--cpu", "--data", str(data), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One ``--cpu`` run a session (:func:`tests.support.shared.once`), only read by its users: a module
    fixture set up again (pytest-xdist may tear it down between two of its tests) finds it made. It runs
    as a lent GPU machine runs it (``make gpu-check``: benches/gpu_check.sh): the whole record in the
    work folder returned, and what the machine hands back in ``handed/``."""

    def make(folder: Path) -> None:
        timeout = _bench("gpu_checks.plan").TOTAL_S["cpu"] + 30
        cmd = ["bash", str(SHELL), str(folder / "handed"), "--cpu", "--data", str(folder / "data" / "demo")]
        env = {**os.environ, "PIXPRO_GPU_CHECK_WORK": str(folder / "out")}
        env["PIXPRO_GPU_CHECK_PYTHON"] = sys.executable
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    folder = once(tmp_path_factory, "gpu-check-cpu", make)
    out, data = folder / "out", folder / "data" / "demo"
    return out, data, json.loads((out / "gpu_check.json").read_text())


@slow
def test_what_a_lent_machine_hands_back_holds_the_whole_record(cpu_run):
    """A lent GPU machine hands back at most 8 files of 16 MiB, 2 folders down: the record, its table
    and one archive of every log and result (no checkpoint payload)."""
    out, _, record = cpu_run
    handed = out.parent / "handed"
    files = sorted(p.name for p in handed.rglob("*"))
    assert files == ["gpu_check-files.tar.gz", "gpu_check.json", "gpu_check.md"]
    assert all((handed / f).stat().st_size < 16 * 2**20 for f in files)
    assert json.loads((handed / "gpu_check.json").read_text()) == record
    with tarfile.open(handed / "gpu_check-files.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    ran = [c["name"] for c in record["checks"] if c["status"] != "not applicable"]
    assert ran and {f"logs/{c}.log" for c in ran} | {f"results/{c}.json" for c in ran} <= names
    assert not [n for n in names if "/checkpoints/" in n or n.endswith(".pt")]


IMAGE_HOLDS = {"torch", "torchvision", "numpy", "PIL", "numba", "fsspec", "rich", "yaml", "aiohttp"}
"""What the check imports that the lent machines' image holds (/work/.library/device/KINDS.md)."""
NOT_REACHED = {
    "s3fs": "an s3:// store",
    "botocore": "an s3:// store",
    "wandb": "logging.wandb",
}
"""Imported by a module the check loads, only for what no check's spec uses."""


def test_every_package_the_check_imports_is_on_a_lent_machine_or_carried():
    """Every third-party import reachable from the check (its modules and ours they import, at module
    or function level) is in the machine's image or among ``make gpu-wheels``' wheels, the only packages
    a lent machine can have: anything else fails the check there, with no index to install from."""
    wheels = re.search(r"^GPU_WHEELS := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert wheels is not None
    carried = {
        {"pydantic_core": "pydantic_core", "annotated-types": "annotated_types"}.get(w, w.replace("-", "_"))
        for w in wheels[1].split()
    }
    ours = {"pixpro", "launch", "schemas", "cluster", "gpu_checks", "tests", "benches"}
    todo, seen, found = [SCRIPT, *(BENCHES / "gpu_checks").rglob("*.py")], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                top, parts = name.split(".")[0], name.split(".")
                if top not in ours:
                    found |= set() if top in sys.stdlib_module_names else {top}
                    continue
                base = BENCHES if top == "gpu_checks" else REPO
                todo += [
                    p
                    for p in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py"))
                    if p.exists()
                ]
    assert "cluster" not in {p.relative_to(REPO).parts[0] for p in seen}  # no submitit, typer...
    assert found - IMAGE_HOLDS - carried - set(NOT_REACHED) == set()


def _check(record: dict, name: str) -> dict:
    return next(c for c in record["checks"] if c["name"] == name)


@slow
def test_record_has_every_check_in_order_with_its_fields(cpu_run):
    out, _, record = cpu_run
    plan, rec = _bench("gpu_checks.plan"), _bench("gpu_checks.record")
    assert record["schema"] == rec.SCHEMA and record["mode"] == "cpu"
    assert [c["name"] for c in record["checks"]] == [c.name for c in plan.CHECKS]
    for c in record["checks"]:
        assert tuple(c) == rec.FIELDS, c["name"]
        assert c["status"] in rec.STATUSES
        assert c["budget_s"] <= plan.BY_NAME[c["name"]].budget("cpu")  # a bound (scaled down if late)
    assert record["seconds"] > 0 and record["total_budget_s"] == plan.TOTAL_S["cpu"]
    table = (out / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(plan.CHECKS) + 1  # header + one row per check
    assert all((out / "logs" / f"{c.name}.log").exists() for c in plan.CHECKS if not c.gpu_only)


@slow
def test_gpu_only_checks_say_not_applicable_and_the_rest_pass(cpu_run):
    _, _, record = cpu_run
    statuses = {c["name"]: (c["status"], c["reason"]) for c in record["checks"]}
    for name in ("step_fp16_cl", "step_fp16"):
        assert statuses.pop(name)[0] == "not applicable"
        assert _check(record, name)["reason"].startswith(NA)
    assert {n: s for n, (s, _) in statuses.items() if s != "pass"} == {}, statuses


@slow
def test_job_runs_the_real_trainer_twice_and_ends_bitwise_equal(cpu_run):
    _, _, record = cpu_run
    s, job = record["sizes"], _check(record, "job")["numbers"]
    assert job["ranks"] == 2 and job["backend"] == "gloo"
    assert job["exit_codes"] == {"A": 0, "B_stop": 75, "B_resume": 0}
    assert job["committed_at_stop"] == s["job_stop"] and job["resumed_in_log"]
    assert job["final_steps"] == [s["job_steps"]] * 2
    assert job["leaves_compared"] > 100 and job["leaves_differing"] == 0 and job["max_abs_diff"] == 0.0
    assert job["spec"]["deterministic"] and job["spec"]["optim"]["optimizer"] == "lars"
    assert set(job["wall_s"]) == {"A", "B_stop", "B_resume"} and all(v > 0 for v in job["wall_s"].values())
    planes = job["collectives"]
    # the per-step preempt/save agreement and the other control-plane calls, on the gloo control group
    assert planes["ranks_reporting"] == 2 and min(planes["control_calls_per_rank"]) > 0
    assert any(re.match(r"all_reduce@group\d", k) for k in planes["calls_rank0"])
    # the synchronized BatchNorm's collectives ran on the data plane (world size 2 converts BN)
    assert any(k.startswith("all_gather_single@default") for k in planes["calls_rank0"])


@slow
def test_syncbn_and_host_syncs_on_cpu(cpu_run):
    _, _, record = cpu_run
    syncbn = _bench("gpu_checks.syncbn")
    n = _check(record, "syncbn")["numbers"]
    assert n["active"] and all(n["collectives_ok"].values()) and not n["fused_kernels"]
    assert n["out_dtype"] == "torch.bfloat16" and n["out_channels_last"] and n["grad_channels_last"]
    assert 0 < n["forward_rel"] <= syncbn.TOLERANCE and 0 < n["input_grad_rel"] <= syncbn.TOLERANCE
    assert max(n["running_mean_abs"], n["running_var_rel"]) <= syncbn.STATS_TOLERANCE
    assert n["host_syncs"] == 0

    bf16 = _check(record, "step_bf16_cl")["numbers"]
    assert bf16["amp_dtype"] == "torch.bfloat16" and bf16["memory_format"] == "torch.channels_last"
    assert bf16["host_syncs_per_step"] == 0 and bf16["sync_counter"] == "HostSyncCounter"
    fp32 = _check(record, "step_bf16")["numbers"]  # on CPU without cpu_autocast: fp32, as the trainer
    assert fp32["amp_dtype"] == "None" and fp32["host_syncs_per_step"] == 0
    for n in (bf16, fp32):
        assert n["steps_done"] == record["sizes"]["steps"] == len(n["losses"])
        assert all(math.isfinite(v) for v in n["losses"]) and n["loss_falling"]


@slow
def test_other_cpu_results(cpu_run):
    _, _, record = cpu_run
    env = _check(record, "env")["numbers"]
    assert env["torch"].startswith("2.") and env["gpu_name"] == NA

    th = _check(record, "throughput")["numbers"]
    assert th["pixpro_img_per_s"] > 0 and th["floor_img_per_s"] > 0
    assert th["step_over_floor"] == pytest.approx(th["pixpro_step_ms"] / th["floor_step_ms"], rel=0.01)

    inp = _check(record, "input")["numbers"]
    assert set(inp["img_per_s_by_workers"]) <= {str(w) for w in record["sizes"]["workers"]}
    assert inp["model_img_per_s"] == th["pixpro_img_per_s"] and inp["workers_needed_per_gpu"] >= 1

    ck = _check(record, "checkpoint")["numbers"]
    assert ck["load_differences"] == [] and ck["resumed_step"] == ck["committed_step"]
    assert ck["save_stall_ms"] > 0 and ck["train_pt_mb"] > 1

    co = _check(record, "compile")["numbers"]
    assert co["backend"] == "aot_eager" and co["recompiles_after_warmup"] == 0 and co["speedup"] > 0


@slow
def test_only_reruns_one_check_and_keeps_the_others(cpu_run, tmp_path):
    shared, data, record = cpu_run
    out = tmp_path / "out"
    shutil.copytree(shared, out)  # the shared run stays as it was made
    res = _run(out, data, "--only", "env")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    merged = json.loads((out / "gpu_check.json").read_text())
    assert [c["name"] for c in merged["checks"]] == [c["name"] for c in record["checks"]]
    assert _check(merged, "job") == _check(record, "job")
    assert merged["seconds"] > record["seconds"]


def test_a_check_past_its_budget_is_killed_and_recorded_as_timeout(tmp_path):
    plan, runner, rec = _bench("gpu_checks.plan"), _bench("gpu_checks.runner"), _bench("gpu_checks.record")
    for sub in ("results", "logs"):
        (tmp_path / sub).mkdir()
    ctx = {"mode": "cpu", "quick": True, "sizes": plan.sizes(True, True), "data": str(tmp_path)}
    ctx_path = tmp_path / "ctx.json"
    ctx_path.write_text(json.dumps({**ctx, "work": str(tmp_path)}))
    res = runner.run_check(plan.BY_NAME["job"], 1.0, ctx_path, tmp_path, "cpu")
    assert res["status"] == "timeout" and res["reason"].startswith("killed after")
    assert res["budget_s"] == 1.0 and tuple(res) == rec.FIELDS  # how soon after: benches/bench_deadlines.py


def test_kill_tree_reaches_processes_in_sessions_of_their_own(tmp_path):
    """torchrun starts each trainer in a session of its own: a kill of the check's session would miss it."""
    runner = _bench("gpu_checks.runner")
    pid_file = tmp_path / "grandchild"
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(60)']"
    code = (
        f"import subprocess, sys, time; p = subprocess.Popen({sleeper}, start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    runner.kill_tree(child.pid)
    child.wait(timeout=60)
    deadline = time.monotonic() + 60
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_budgets_add_up_to_at_most_the_total(monkeypatch):
    plan = _bench("gpu_checks.plan")
    assert plan.budget_problems() == []
    for mode in ("gpu", "cpu"):
        assert plan.SETUP_S[mode] + sum(c.budget(mode) for c in plan.CHECKS) <= plan.TOTAL_S[mode]
    assert plan.TOTAL_S["gpu"] < 8 * 60  # under 8 minutes: a rerun fits in the same GPU loan
    assert plan.TOTAL_S["cpu"] + 30 < 600  # the CPU run fits pytest's timeout (pyproject.toml)
    smallest = min(c.budget(m) for c in plan.CHECKS for m in ("gpu", "cpu") if c.budget(m))
    assert smallest > plan.GRACE_S  # every check has time of its own before its deadline
    bigger = plan.CheckDef("big", "big", "env:check_env", plan.TOTAL_S["gpu"], 1)
    monkeypatch.setattr(plan, "CHECKS", (*plan.CHECKS, bigger))
    assert [p for p in plan.budget_problems() if p.startswith("gpu:")]


def test_checks_never_import_the_cli():
    """gpu_check.py imports the package, never the other way round: no import circle."""
    for path in (BENCHES / "gpu_checks").rglob("*.py"):
        assert not re.search(r"^\s*(from|import) gpu_check\b(?!s)", path.read_text(), re.M), path


def test_a_training_step_has_no_intended_host_sync():
    """The trainer's step queues without reading the device (the loss is read by _read_step, at logging
    steps and before saves); the one sync a step may make is GradScaler's, in fp16."""
    syncs = _bench("gpu_checks.syncs")
    from launch.train import Trainer

    train = REPO / "launch" / "train.py"
    lines = train.read_text().splitlines()
    assert not any(syncs.expected_sync(str(train), n) for n in range(1, len(lines) + 1))
    assert syncs.expected_sync("/venv/lib/site-packages/torch/amp/grad_scaler.py", 371)
    host_read = re.compile(r"\.(item|tolist|cpu)\(|(?<![\w.])(float|int|bool)\(")
    step = inspect.getsource(Trainer._train_step)
    body = step.split('"""')[-1]  # the code after the docstring
    assert not host_read.search(body), "a host read in Trainer._train_step: each step would sync"
    assert host_read.search(inspect.getsource(Trainer._read_step))


def test_diff_states_reports_each_differing_leaf():
    import torch

    common = _bench("gpu_checks.common")
    a = {"w": torch.zeros(3), "step": 4, "rng": [torch.ones(2)]}
    assert common.diff_states(a, {**a}) == []
    assert common.diff_states(a, {**a, "w": torch.tensor([0.0, 0.5, 0.0])}) == [("state.w", 0.5)]
    assert common.diff_states(a, {**a, "step": 5}) == [("state.step", math.inf)]
    assert common.diff_states(a, {**a, "rng": []}) == [("state.rng.len", math.inf)]
    assert common.count_leaves(a) == 3


_FORKED_PAST_BUDGET = """
import json, sys
from pathlib import Path
sys.path[:0] = sys.argv[3:5]
from gpu_checks import plan, runner
ctx_path, out = Path(sys.argv[1]), Path(sys.argv[2])
print(json.dumps(runner.run_check(plan.BY_NAME["job"], 8.0, ctx_path, out, "cpu", fork=True)))
"""


@pytest.mark.slow
def test_a_forked_check_past_its_budget_is_a_timeout_and_leaves_no_process(tmp_path):
    """The check forked from the runner (``gpu_checks.runner``'s default where fork is safe, which a
    pytest worker with its threads is not: a fresh interpreter runs the runner), given 8 s: its own
    deadline comes while its launch.run job trains, and nothing it started outlives it."""
    plan = _bench("gpu_checks.plan")
    for sub in ("results", "logs"):
        (tmp_path / sub).mkdir()
    ctx = {"mode": "cpu", "quick": True, "sizes": plan.sizes(True, True), "data": str(tmp_path)}
    ctx_path = tmp_path / "ctx.json"
    ctx_path.write_text(json.dumps({**ctx, "work": str(tmp_path)}))
    proc = subprocess.run(
        [sys.executable, "-c", _FORKED_PAST_BUDGET, str(ctx_path), str(tmp_path), str(BENCHES), str(REPO)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["status"] == "timeout" and (tmp_path / "job").is_dir(), res
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(tmp_path).encode() in _cmdline(p)]
    assert not left, [_cmdline(p) for p in left]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
