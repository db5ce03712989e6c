"""benches/gpu_check.py in its CPU mode: every check runs, so the GPU acceptance script cannot rot.

One full ``--cpu`` run (about a minute on 2 cores) feeds the assertions on the record's shape and the CPU
results; a ``--only`` rerun checks the merge, and a child killed past its budget checks the timeout path.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benches" / "gpu_check.py"
FIELDS = {"name", "title", "status", "reason", "summary", "numbers", "seconds", "budget_s"}
NA = "not applicable on CPU"


def _bench(name: str) -> Any:
    sys.path.insert(0, str(REPO / "benches"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benches"))


def _gpu_check() -> Any:
    return _bench("gpu_check")


def _run(out: Path, data: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), str(out), "--cpu", "--data", str(data), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    out, data = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("gpu_check_data") / "demo"
    res = _run(out, data)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, data, json.loads((out / "gpu_check.json").read_text())


def _check(record: dict, name: str) -> dict:
    return next(c for c in record["checks"] if c["name"] == name)


def test_record_has_every_check_in_order_with_its_fields(cpu_run):
    out, _, record = cpu_run
    gc = _gpu_check()
    assert record["schema"] == gc.SCHEMA and record["mode"] == "cpu"
    assert [c["name"] for c in record["checks"]] == [c.name for c in gc.CHECKS]
    for c in record["checks"]:
        assert set(c) == FIELDS, c["name"]
        assert c["status"] in gc.STATUSES
        assert c["seconds"] <= c["budget_s"] + gc.GRACE_S
    assert record["seconds"] < record["total_budget_s"]
    table = (out / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(gc.CHECKS) + 1  # header + one row per check
    assert all((out / "logs" / f"{c.name}.log").exists() for c in gc.CHECKS if not c.gpu_only)


def test_gpu_only_checks_say_not_applicable_and_the_rest_pass(cpu_run):
    _, _, record = cpu_run
    statuses = {c["name"]: (c["status"], c["reason"]) for c in record["checks"]}
    for name in ("step_fp16_cl", "step_fp16"):
        assert statuses.pop(name)[0] == "not applicable"
        assert _check(record, name)["reason"].startswith(NA)
    assert {n: s for n, (s, _) in statuses.items() if s != "pass"} == {}, statuses


def test_cpu_results(cpu_run):
    _, _, record = cpu_run
    env = _check(record, "env")["numbers"]
    assert env["torch"].startswith("2.") and env["gpu_name"] == NA

    dist = _check(record, "dist")["numbers"]
    assert dist["backend"] == "gloo" and dist["world_size"] == 1 and dist["collectives_ok"]
    assert dist["syncbn_layers"] > 0 and dist["syncbn_trained"].startswith(NA)
    assert dist["bn_stats_moved"] and all(math.isfinite(v) for v in dist["losses"])

    for name in ("step_bf16_cl", "step_bf16"):
        n = _check(record, name)["numbers"]
        assert n["steps_done"] == record["sizes"]["steps"] == len(n["losses"])
        assert all(math.isfinite(v) for v in n["losses"]) and n["loss_falling"]
        assert n["amp_dtype"] == "torch.bfloat16" and n["host_syncs_per_step"] == NA
    assert _check(record, "step_bf16_cl")["numbers"]["memory_format"] == "torch.channels_last"

    th = _check(record, "throughput")["numbers"]
    assert th["pixpro_img_per_s"] > 0 and th["floor_img_per_s"] > 0
    assert th["step_over_floor"] == pytest.approx(th["pixpro_step_ms"] / th["floor_step_ms"], rel=0.01)

    inp = _check(record, "input")["numbers"]
    assert set(inp["img_per_s_by_workers"]) == {str(w) for w in record["sizes"]["workers"]}
    assert inp["model_img_per_s"] == th["pixpro_img_per_s"] and inp["workers_needed_per_gpu"] >= 1

    ck = _check(record, "checkpoint")["numbers"]
    assert ck["load_differences"] == [] and ck["resumed_step"] == ck["committed_step"]
    assert ck["save_stall_ms"] > 0 and ck["train_pt_mb"] > 1

    rs = _check(record, "resume")["numbers"]
    assert rs["bitwise"] and rs["rng_round_trip"] and rs["stopped_at"] == record["sizes"]["resume_stop"]
    assert rs["final_steps"] == [record["sizes"]["resume_steps"]] * 2

    co = _check(record, "compile")["numbers"]
    assert co["backend"] == "aot_eager" and co["recompiles_after_warmup"] == 0 and co["speedup"] > 0


def test_only_reruns_one_check_and_keeps_the_others(cpu_run):
    out, data, record = cpu_run
    res = _run(out, data, "--only", "env")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    merged = json.loads((out / "gpu_check.json").read_text())
    assert [c["name"] for c in merged["checks"]] == [c["name"] for c in record["checks"]]
    assert _check(merged, "resume") == _check(record, "resume")
    assert merged["seconds"] > record["seconds"]


def test_a_check_past_its_budget_is_killed_and_recorded_as_timeout(tmp_path, monkeypatch):
    gc = _gpu_check()
    monkeypatch.setattr(gc, "GRACE_S", 0.0)
    for sub in ("results", "logs"):
        (tmp_path / sub).mkdir()
    ctx = {
        "mode": "cpu",
        "quick": True,
        "sizes": gc.sizes(True, True),
        "data": str(tmp_path),
        "work": str(tmp_path),
    }
    ctx_path = tmp_path / "ctx.json"
    ctx_path.write_text(json.dumps(ctx))
    res = gc.run_check(gc.BY_NAME["resume"], 1.0, ctx_path, tmp_path)
    assert res["status"] == "timeout" and res["reason"].startswith("killed after")
    assert res["seconds"] < 10 and set(res) == FIELDS


def test_sync_classification_knows_the_trainer_s_intended_syncs():
    impl = _bench("gpu_check_impl")
    train = REPO / "launch" / "train.py"
    lines = train.read_text().splitlines()
    intended = [i + 1 for i, ln in enumerate(lines) if any(s in ln for s in impl._EXPECTED_SYNC_LINES)]
    assert len(intended) == 1, "the step's loss/positives read moved: update _EXPECTED_SYNC_LINES"
    assert all(impl._expected_sync(str(train), n) for n in intended)
    backward = next(i + 1 for i, ln in enumerate(lines) if ".backward()" in ln)
    assert not impl._expected_sync(str(train), backward)
    assert impl._expected_sync("/venv/lib/site-packages/torch/amp/grad_scaler.py", 371)


def test_diff_states_reports_each_differing_leaf():
    import torch

    impl = _bench("gpu_check_impl")
    a = {"w": torch.zeros(3), "step": 4, "rng": [torch.ones(2)]}
    assert impl.diff_states(a, {**a}) == []
    assert impl.diff_states(a, {**a, "w": torch.tensor([0.0, 0.5, 0.0])}) == [("state.w", 0.5)]
    assert impl.diff_states(a, {**a, "step": 5}) == [("state.step", math.inf)]
    assert impl.diff_states(a, {**a, "rng": []}) == [("state.rng.len", math.inf)]
