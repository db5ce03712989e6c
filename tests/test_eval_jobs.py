"""Evaluation as a job (``pixpro eval RUN --submit [--after]``, ``pixpro submit --eval TASK``) on the
local executor; the SLURM side (afterok, a resume re-pointing the dependency) is in
``tests/test_eval_slurm.py``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from cluster import evals
from cluster.attempts import AttemptState
from schemas.contract import STEP_PAUSE_ENV, EvalResult
from tests.support.cli import assert_one_line_error, cli, status_json, wait_status, write_spec
from tests.support.trainer import tiny_spec


def _result(state: str, error: str | None = None) -> EvalResult:
    return EvalResult(state=state, started=1.0, ended=None if state == "running" else 2.0, error=error)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("found", "job", "expected"),
    [
        (None, AttemptState("PENDING", "Dependency"), ("PENDING", "Dependency")),  # waits for the run
        (None, AttemptState("PENDING", "DependencyNeverSatisfied"), ("PENDING", "DependencyNeverSatisfied")),
        (None, AttemptState("RUNNING"), ("RUNNING", "")),  # started, not yet written its first result
        (None, AttemptState("COMPLETED", "", 0), ("FAILED", "its job ended without a result")),
        (None, AttemptState("CANCELLED"), ("CANCELLED", "")),
        (None, AttemptState("REQUEUED", "preempted"), ("PENDING", "requeued")),
        (_result("running"), AttemptState("RUNNING"), ("RUNNING", "")),
        (_result("running"), AttemptState("FAILED", "exit 1"), ("FAILED", "ended without a result")),
        (_result("running"), AttemptState("CANCELLED"), ("CANCELLED", "ended without a result")),
        (_result("completed"), AttemptState("COMPLETED"), ("COMPLETED", "")),
        (
            _result("completed"),
            AttemptState("UNKNOWN", "not in squeue or sacct"),
            ("COMPLETED", ""),
        ),  # forgotten
        (_result("failed", "no checkpoint"), AttemptState("FAILED", "exit 3"), ("FAILED", "no checkpoint")),
        (
            _result("failed", "terminated"),
            AttemptState("CANCELLED"),
            ("CANCELLED", "terminated"),
        ),  # pixpro cancel
    ],
)
def test_an_evaluation_is_in_the_state_its_result_or_else_its_job_says(
    found: EvalResult | None, job: AttemptState, expected: tuple[str, str]
) -> None:
    st = evals.state(found, job)
    assert (st.state, st.reason) == expected


def test_the_headline_is_the_tasks_numbers_or_the_state() -> None:
    knn = {"task": "knn", "state": "COMPLETED", "reason": "", "top1": 0.5234, "top5": 0.9, "step": 400}
    assert evals.headline(knn) == "top-1 52.3% top-5 90.0% @ step 400"
    dense = {
        "task": "dense",
        "state": "COMPLETED",
        "reason": "",
        "miou": 0.41,
        "pixel_accuracy": 0.8,
        "step": 7,
    }
    assert evals.headline(dense) == "mIoU 41.0% pixel acc 80.0% @ step 7"
    waiting = {"task": "knn", "state": "PENDING", "reason": "Dependency"}
    assert evals.headline(waiting) == "PENDING (Dependency)"


def test_usage_errors_are_one_line_exit_2_and_queue_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = write_spec(tmp_path / "spec.json", tiny_spec(tmp_path / "data"))
    cases = [
        (["eval", "r1", "--submit", "--random-init", "--data", "d"], "do not go with --submit"),
        (["eval", "r1", "--after", "--data", "d"], "go with --submit"),
        (
            ["eval", "r1", "--submit", "--task", "segment"],
            "--task segment: must be one of dense, linear, knn",
        ),
        (["eval", "r1", "--submit", "--set", "optim.base_lr=1"], "takes only resources.* settings"),
        (["eval", "r1", "--task", "knn"], "--data: labelled data to evaluate on is required"),
        (["submit", "--executor", "local", "--eval-data", "d", str(spec)], "--eval-data: only with --eval"),
        (
            ["submit", "--executor", "local", "--eval", "segment", str(spec)],
            "must be one of dense, linear, knn",
        ),
        (["submit", "--executor", "local", "--eval", "knn", str(spec)], "needs labelled data: --eval-data"),
        (
            ["submit", "--executor", "local", "--eval", "knn", "--eval-data", "nope", str(spec)],
            "--eval-data: data folder nope does not exist",
        ),
        (["submit", "--executor", "local", "--eval", "segment", str(spec)], "--eval segment: must be one of"),
    ]
    # a spec whose preflight fails (no data, none generated): --eval's usage errors come first
    no_data = write_spec(tmp_path / "no-data.json", tiny_spec(tmp_path / "missing", data__demo=None))
    cases.append((["submit", "--executor", "local", "--eval", "knn", str(no_data)], "needs labelled data"))
    for args, words in cases:
        line = assert_one_line_error(cli(*args, home=home, cwd=tmp_path), 2)
        assert words in line, (args, line)
    sweep = cli(
        "submit", "--executor", "local", "--eval", "knn", "--sweep", "seed=1,2", str(no_data), home=home
    )
    assert sweep.returncode == 2 and sweep.stderr.splitlines() == [
        f"pixpro: sweep member seed={s}: an evaluation (knn) needs labelled data: --eval-data (the spec has "
        "no monitor.data)"
        for s in (1, 2)
    ], sweep.stderr
    assert "missing" in assert_one_line_error(
        cli("submit", "--executor", "local", str(no_data), home=home), 2
    )
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_a_set_of_the_jobs_gpus_wins_over_the_default_and_is_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--set resources.gpus_per_node=N`` without ``--gpus`` is the job's GPUs (the implicit one-GPU
    default silently won, even over a value the schema refuses); with ``--gpus`` it is refused, as is
    a second node."""
    from cluster.errors import UsageError
    from schemas import SpecError
    from tests.support.cli import run_cli
    from tests.support.runs import fake_runs

    home = tmp_path / "home"
    monkeypatch.setenv("PIXPRO_HOME", str(home))
    (record,) = fake_runs(home, 1)
    record.resources["gpus_per_node"] = 8
    write_spec(record.spec_path, tiny_spec(tmp_path / "data"))
    assert evals.eval_spec(record, None, ()).resources.gpus_per_node == 1  # the default: one GPU
    assert evals.eval_spec(record, 2, ()).resources.gpus_per_node == 2
    sets = ("resources.gpus_per_node=4", "resources.nodes=1")
    assert evals.eval_spec(record, None, sets).resources.gpus_per_node == 4
    with pytest.raises(SpecError, match=r"resources.gpus_per_node: .*\(from --set resources.gpus_per_node\)"):
        evals.eval_spec(record, None, ("resources.gpus_per_node=99",))
    with pytest.raises(UsageError, match=r"--gpus and --set resources\.gpus_per_node both set"):
        evals.eval_spec(record, 2, ("resources.gpus_per_node=4",))
    with pytest.raises(UsageError, match=r"resources\.nodes=2: an evaluation job runs on one node"):
        evals.eval_spec(record, None, ("resources.nodes=2",))

    data = tmp_path / "labelled"
    data.mkdir()
    args = ("eval", record.run_id, "--task", "knn", "--submit", "--data", str(data))
    code, _, err = run_cli(*args, "--set", "resources.gpus_per_node=99")
    assert code == 2 and len(err.splitlines()) == 1 and "(from --set resources.gpus_per_node)" in err, err
    assert not record.paths.evals.exists()  # nothing written, nothing queued


def _evals_done(row: dict[str, Any], n: int) -> bool:
    found = row.get("evals") or []
    return len(found) == n and all(e["state"] in ("COMPLETED", "FAILED", "CANCELLED") for e in found)


def _eval_states(row: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["eval_id"], e["state"], e["reason"]) for e in row.get("evals") or []]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_evaluations_after_the_run_and_of_its_last_checkpoint(tmp_path: Path) -> None:
    """``submit --eval knn`` waits for the run, through a cancel and a resume of it as SLURM's afterok
    re-pointed by the resume, evaluates its final checkpoint and status shows it; ``pixpro cancel`` of an
    evaluation's job ends that one only; an evaluation of a completed run starts at once."""
    home, data = tmp_path / "home", tmp_path / "data"
    spec = write_spec(tmp_path / "spec.json", tiny_spec(data))
    proc = cli(
        "submit", "--json", "--executor", "local", "--no-preflight", "--eval", "knn", "--eval-data", "data",
        str(spec), home=home, cwd=tmp_path, env={STEP_PAUSE_ENV: "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    run_id, job = out["run_id"], out["job_id"]
    waiting = ("PENDING", "Dependency")  # its local waiter runs, but it waits for the run: as afterok
    wait_status(
        home,
        run_id,
        lambda r: bool(r["evals"]) and (r["evals"][0]["state"], r["evals"][0]["reason"]) == waiting,
        60,
    )
    (queued,) = out["evals"]
    assert queued == {"run_id": run_id, "eval_id": "knn-1", "job_id": queued["job_id"], "after": job}
    assert re.fullmatch(r"eval-\d+", queued["job_id"])  # numbered as local attempts are: unique here
    request = json.loads((home / "runs" / run_id / "evals" / "knn-1" / "request.json").read_bytes())
    assert request["data"] == str(data)  # relative to where the user typed it, made absolute
    also = cli(
        "eval", run_id, "--task", "dense", "--data", str(data), "--submit", "--after", "--json", home=home
    )
    assert also.returncode == 0, also.stderr
    dense_job = json.loads(also.stdout)["job_id"]
    assert cli("cancel", run_id, home=home).returncode == 0  # mid-run: both wait for a resume, as on SLURM
    never = ("PENDING", "DependencyNeverSatisfied")
    wait_status(home, run_id, lambda r: [e[1:] for e in _eval_states(r)] == [never, never], 120)
    stopped = cli("cancel", dense_job, home=home)
    assert stopped.stdout.strip() == f"cancelled eval dense-1 of run {run_id}: job {dense_job}", stopped
    wait_status(home, run_id, lambda r: _eval_states(r)[1][1] == "CANCELLED", 60)
    again = cli("cancel", dense_job, home=home)
    assert again.stdout.strip() == f"eval dense-1 of run {run_id} has nothing to cancel", again
    assert cli("resume", run_id, home=home).returncode == 0
    row = wait_status(home, run_id, lambda r: _evals_done(r, 2), 400)
    assert row["state"] == "COMPLETED", row
    knn, cancelled = row["evals"]
    assert knn["state"] == "COMPLETED" and knn["step"] == row["total_steps"] == 10, knn
    assert 0 <= knn["top1"] <= knn["top5"] <= 1
    assert cancelled["state"] == "CANCELLED" and cancelled["step"] is None, cancelled

    dense = cli(
        "eval", run_id, "--task", "dense", "--data", str(data), "--submit", "--after", "--json", home=home
    )
    assert dense.returncode == 0, dense.stderr
    assert json.loads(dense.stdout)["after"] is None  # the run completed already: nothing to wait for
    row = wait_status(home, run_id, lambda r: _evals_done(r, 3), 300)
    assert [(e["eval_id"], e["state"]) for e in row["evals"]] == [
        ("knn-1", "COMPLETED"),
        ("dense-1", "CANCELLED"),
        ("dense-2", "COMPLETED"),
    ]
    assert 0 <= row["evals"][2]["miou"] <= 1 and row["evals"][2]["step"] == 10
    table = cli("status", run_id, home=home)
    assert "knn-1" in table.stdout and "top-1" in table.stdout and "mIoU" in table.stdout, table.stdout
    # an evaluation's job id names it as an attempt's names its run: status shows the run, logs its log
    assert status_json(home, queued["job_id"])["run_id"] == run_id
    log = cli("logs", queued["job_id"], home=home)
    assert log.returncode == 0 and log.stdout.strip(), log

    missing = cli("eval", run_id, "--task", "knn", "--data", str(tmp_path / "nope"), "--submit", home=home)
    assert "--data: data folder" in assert_one_line_error(missing, 2)  # refused, not a job that fails later
    assert len(list((home / "runs" / run_id / "evals").iterdir())) == 3


@pytest.mark.parametrize(
    ("after", "waits_on", "after_job"),
    [
        (None, None, None),  # the latest checkpoint now
        ("local-3", "local-3", "local-3"),
        (evals.LATEST_ATTEMPT, evals.LATEST_ATTEMPT, None),  # a local sweep member not started yet
        ("", evals.LATEST_ATTEMPT, None),  # as requests written before the marker say it
    ],
)
def test_what_an_evaluation_waits_on_is_read_one_way(
    after: str | None, waits_on: str | None, after_job: str | None
) -> None:
    from schemas.contract import EvalRequest

    request = EvalRequest(
        eval_id="knn-1", task="knn", data="/d", executor="local", submitted=1.0, after=after
    )
    assert (evals.waits_on(request), evals.after_job(request)) == (waits_on, after_job)


def test_an_evaluation_of_a_sweep_member_not_started_yet_waits_as_a_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``submit --sweep ... --max-parallel 1 --eval knn`` on the local executor: a member the sweep runner
    has not started has no job to wait for; its evaluation's waiter runs, and status says it waits for
    the run (``PENDING (Dependency)``), as it does once the member has a job, not ``RUNNING``."""
    from cluster import local, sweep_runner
    from tests.support.cli import run_cli, status_row

    home = tmp_path / "home"
    spec = write_spec(tmp_path / "spec.json", tiny_spec(tmp_path / "data"))
    monkeypatch.setenv("PIXPRO_HOME", str(home))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_runner, "spawn_sweep_runner", lambda *a, **k: 0)  # no member starts
    monkeypatch.setattr(sweep_runner, "runner_alive", lambda sweep_dir: True)  # as the one it stands for
    rc, out, err = run_cli(
        "submit", "--json", "--executor", "local", "--no-preflight", "--max-parallel", "1",
        "--sweep", "optim.base_lr=2,4", "--eval", "knn", "--eval-data", "data", str(spec),
    )  # fmt: skip
    assert rc == 0, err
    submitted = json.loads(out)
    members = [m["run_id"] for m in submitted["members"]]
    try:
        assert [e["after"] for e in submitted["evals"]] == ["", ""]  # "when the run completed"
        for run_id in members:
            request = json.loads((home / "runs" / run_id / "evals" / "knn-1" / "request.json").read_bytes())
            assert request["after"] == evals.LATEST_ATTEMPT, request
            row = status_row(home, run_id)
            assert (row["state"], row["reason"]) == ("PENDING", "waits for a slot of its sweep"), row
            assert [(e["state"], e["reason"], e["after"]) for e in row["evals"]] == [
                ("PENDING", "Dependency", evals.LATEST_ATTEMPT)
            ], row["evals"]
    finally:
        for run_id, ev in zip(members, submitted["evals"], strict=True):
            job = local.read_job(home / "runs" / run_id, ev["job_id"])
            if job is not None:
                local.stop(job)
