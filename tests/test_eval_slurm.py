"""Evaluation as a SLURM job on the test cluster: ``--after`` is an ``afterok`` dependency on the run's
job, a cancelled run leaves it waiting, ``pixpro resume`` points it at the new attempt, and the result
lands in the run folder for ``pixpro status``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import assert_one_line_error, cli, status_json, wait_status
from tests.support.procs import wait_for
from tests.test_cli_slurm import DATA_DIR, SHARED, _jobs, cluster, home, spec_file, submit

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
__all__ = ["cluster", "home", "spec_file"]  # the fixtures of test_cli_slurm, used here by name


def _dependency(job_id: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%E", "-j", job_id], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


@pytest.mark.timeout(900)
def test_eval_after_waits_for_the_run_follows_its_resume_and_reports_in_status(
    home: Path, spec_file: Path
) -> None:
    run_id, first = submit(home, spec_file, "--nodes", "1", "--gpus", "1")
    data = str(SHARED / DATA_DIR)
    proc = cli("eval", run_id, "--task", "knn", "--data", data, "--submit", "--after", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    request = json.loads(proc.stdout)
    eval_job = request["job_id"]
    _jobs.append(eval_job)
    assert request["after"] == first and request["eval_id"] == "knn-1", request
    assert _dependency(eval_job).startswith(f"afterok:{first}"), _dependency(eval_job)
    spare = cli("eval", run_id, "--task", "knn", "--data", data, "--submit", "--after", "--json", home=home)
    spare_job = json.loads(spare.stdout)["job_id"]
    _jobs.append(spare_job)

    # a cancelled run never satisfies afterok: the evaluation waits, and status says why
    assert cli("cancel", run_id, home=home).returncode == 0
    row = wait_status(home, run_id, lambda r: r["state"] == "CANCELLED", 120)
    ev = row["evals"][0]
    assert ev["state"] == "PENDING" and ev["reason"].startswith("Dependency"), ev
    stopped = cli("cancel", spare_job, home=home)  # one evaluation, by its job id
    assert stopped.stdout.strip() == f"cancelled eval knn-2 of run {run_id}: job {spare_job}", stopped
    wait_status(home, run_id, lambda r: r["evals"][1]["state"] == "CANCELLED", 60)
    refused = cli("eval", run_id, "--task", "knn", "--data", data, "--submit", "--after", home=home)
    assert "will not complete by itself" in assert_one_line_error(refused, 2)

    resumed = cli("resume", run_id, "--json", home=home)
    assert resumed.returncode == 0, resumed.stderr
    second = json.loads(resumed.stdout)["job_id"]
    _jobs.append(second)
    assert _dependency(eval_job).startswith(f"afterok:{second}"), _dependency(eval_job)

    def evaluated(r: dict) -> bool:
        return r["state"] == "COMPLETED" and r["evals"][0]["state"] in ("COMPLETED", "FAILED")

    row = wait_status(home, run_id, evaluated, 600)
    ev = row["evals"][0]
    assert row["evals"][1]["state"] == "CANCELLED", row["evals"]
    assert ev["state"] == "COMPLETED" and ev["after"] == second, ev
    assert ev["step"] == row["total_steps"] and 0 <= ev["top1"] <= ev["top5"] <= 1, ev
    log = home / "runs" / run_id / "evals" / "knn-1" / "submitit" / f"{eval_job}_0_log.out"
    assert "pixpro eval knn-1: completed at step" in log.read_text(), log

    def job_ended() -> str:
        args = ["sacct", "-X", "-n", "-P", "-o", "JobName,State", "-j", eval_job]
        line = subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
        return line if line.split("|")[-1] in ("COMPLETED", "FAILED", "CANCELLED") else ""

    ended = wait_for("the evaluation job's end in sacct", job_ended, 120)  # it exits after the result
    assert ended.endswith("-eval-knn|COMPLETED"), ended
    assert status_json(home, run_id)["evals"][0]["top1"] == ev["top1"]
