"""``plot``, ``export`` and ``eval`` take a run as ``status`` does (run id, an attempt's job id, a unique
prefix); a sweep's id, an evaluation's job id or an id nothing has is refused in one line that says so,
not as "checkpoint store ID does not exist"."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from schemas.contract import LATEST, EvalRequest
from tests.support.cli import assert_one_line_error, cli
from tests.support.runs import fake_runs
from tests.support.trainer import tiny_spec, write_spec


def test_the_tools_resolve_ids_as_status_does(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (record,) = fake_runs(home, 1)
    job = record.attempts[0]
    request = EvalRequest(eval_id="knn-1", task="knn", data="/d", executor="slurm", submitted=time.time())
    folder = record.paths.eval("knn-1")
    folder.request.parent.mkdir(parents=True)
    folder.request.write_text(request.model_copy(update={"job_id": "4242"}).model_dump_json())

    line = assert_one_line_error(cli("plot", "nope-123", "-o", "x.png", home=home, cwd=tmp_path), 3)
    assert "no run or job 'nope-123'" in line, line
    line = assert_one_line_error(cli("export", "4242", "-o", "x.pt", home=home, cwd=tmp_path), 2)
    assert f"4242 is the job of evaluation knn-1 of run {record.run_id}: give the run id" in line, line
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.pt").exists()
    found = cli("plot", job, "-o", "x.png", home=home, cwd=tmp_path)  # an attempt's job id: its run
    assert found.returncode == 0 and "wrote x.png" in found.stdout, found.stderr


def test_an_evaluation_of_a_run_without_a_checkpoint_is_refused_at_submit(tmp_path: Path) -> None:
    """Without ``--after`` an evaluation reads the latest checkpoint now: none yet is refused here, as the
    foreground ``eval`` refuses it, not queued to fail in its job."""
    home = tmp_path / "home"
    record = fake_runs(home, 2)[1]  # a local run: a refusal that failed would start no SLURM job
    (Path(record.checkpoint_url) / LATEST).unlink()  # as before its first commit
    write_spec(record.paths.spec, tiny_spec(tmp_path / "data"))
    (tmp_path / "labelled").mkdir()
    proc = cli(
        "eval", record.run_id, "--task", "knn", "--data", "labelled", "--submit", home=home, cwd=tmp_path
    )
    line = assert_one_line_error(proc, 3)
    assert f"run {record.run_id} has no committed checkpoint yet: --after" in line, line
    assert not record.paths.evals.exists()


@pytest.mark.cluster
def test_an_evaluation_sbatch_refuses_is_one_line(tmp_path: Path) -> None:
    """sbatch's own lines (``sbatch: error: ...``) stay out of the output: one line says what to fix."""
    home = tmp_path / "home"
    (record,) = fake_runs(home, 1)  # a SLURM run with a checkpoint
    write_spec(record.paths.spec, tiny_spec(tmp_path / "data"))
    (tmp_path / "labelled").mkdir()
    args = ("eval", record.run_id, "--task", "knn", "--data", "labelled", "--submit")
    proc = cli(*args, "--set", "resources.partition=nope", home=home, cwd=tmp_path)
    line = assert_one_line_error(proc, 2)
    assert "resources.partition: invalid partition 'nope'" in line, line
    proc = cli(*args, "--set", "resources.constraint=nosuchfeature", home=home, cwd=tmp_path)
    line = assert_one_line_error(proc, 2)
    assert line.count("Invalid feature specification") == 1, line  # said once, not as sbatch then submitit
