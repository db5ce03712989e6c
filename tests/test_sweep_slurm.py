"""A sweep on the test cluster: one job array whose members are full runs; cancelled and resumed, its
members' next attempts are one array under the same ``--max-parallel``; a member requeued mid-run ends
exactly as its own uninterrupted run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import cli, status_json, wait_status
from tests.support.procs import wait_for
from tests.support.trainer import assert_identical, final_state
from tests.test_cli_slurm import (
    DATA_DIR,
    SHARED,
    _jobs,
    cluster,
    finished,
    home,
    local_latest,
    no_failed,
    run_dir,
    spec_file,
    submit,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
__all__ = ["cluster", "home", "spec_file"]  # the fixtures of test_cli_slurm, used here by name


@pytest.mark.timeout(900)
def test_sweep_is_one_array_and_a_requeued_member_ends_equal_to_its_own_run(
    home: Path, spec_file: Path
) -> None:
    refs = {lr: submit(home, spec_file, "--set", f"optim.base_lr={lr}") for lr in ("2.0", "4.0")}
    proc = cli(
        "submit", "--json", "--no-preflight", "--max-parallel", "2", "--sweep", "optim.base_lr=2,4",
        str(spec_file), "--eval", "knn", "--eval-data", str(SHARED / DATA_DIR),
        home=home, cwd=spec_file.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    members, array = out["members"], out["array_job"]
    _jobs.append(array)
    assert [m["job_id"] for m in members] == [f"{array}_0", f"{array}_1"], out
    assert [m["sweep_values"] for m in members] == [{"optim.base_lr": 2.0}, {"optim.base_lr": 4.0}]
    # one evaluation per member, each afterok on its array task
    assert [(e["run_id"], e["after"]) for e in out["evals"]] == [(m["run_id"], m["job_id"]) for m in members]
    _jobs.extend(e["job_id"] for e in out["evals"])

    first = members[0]
    ckpt = run_dir(home, first["run_id"]) / "checkpoints"
    latest = local_latest(ckpt)
    wait_for("a first committed checkpoint", lambda: (latest() or {}).get("step", 0) >= 2, 240)
    # cancelled and resumed: the members' next attempts are one new array, still at most 2 at once
    assert cli("cancel", out["sweep_id"], home=home).returncode == 0
    for m in members:
        wait_status(home, m["run_id"], lambda r: r["state"] == "CANCELLED", 120)
    again = cli("resume", "--json", out["sweep_id"], home=home)
    assert again.returncode == 0, again.stderr
    resumed = json.loads(again.stdout)
    second = resumed[0]["job_id"].partition("_")[0]
    _jobs.append(second)
    assert resumed == [{"run_id": m["run_id"], "job_id": f"{second}_{i}"} for i, m in enumerate(members)]
    shown = subprocess.run(["scontrol", "show", "job", second], capture_output=True, text=True, timeout=30)
    assert "ArrayTaskThrottle=2" in shown.stdout, shown.stdout
    restarted = f"{second}_0"
    wait_for("the resumed attempt's commit", lambda: (latest() or {}).get("attempt") == f"{restarted}.0", 240)
    subprocess.run(["scontrol", "requeue", restarted], check=True, timeout=30)
    seen: list[str] = []
    wait_status(home, first["run_id"], lambda r: r["state"] == "REQUEUED", 60, seen, interval=0.5)
    rows = [wait_status(home, m["run_id"], finished, 400, seen if m is first else None) for m in members]
    no_failed(seen)
    assert [a["job_id"] for a in rows[0]["attempts"]] == [first["job_id"], restarted], rows[0]
    assert "REQUEUED" in rows[0]["attempts"][1]["history"], rows[0]
    assert json.loads((ckpt / "latest").read_bytes())["attempt"] == f"{restarted}.1"
    assert (run_dir(home, first["run_id"]) / "submitit" / f"{restarted}_0_log.out").exists()

    def evaluated(r: dict) -> bool:
        return r["evals"][0]["state"] in ("COMPLETED", "FAILED")

    for m in members:
        (ev,) = wait_status(home, m["run_id"], evaluated, 300)["evals"]
        assert ev["state"] == "COMPLETED" and ev["step"] == rows[0]["total_steps"], ev
    listed = status_json(home, out["sweep_id"])
    assert [(r["sweep_id"], r["sweep_values"], r["state"]) for r in listed] == [
        (out["sweep_id"], m["sweep_values"], "COMPLETED") for m in members
    ]
    for (lr, (ref_run, ref_job)), member in zip(refs.items(), members, strict=True):
        wait_status(home, ref_job, finished, 400)
        ref = final_state(str(run_dir(home, ref_run) / "checkpoints"))
        got = final_state(str(run_dir(home, member["run_id"]) / "checkpoints"))
        assert_identical(ref, got, f"sweep member base_lr={lr}")
