"""``pixpro submit --sweep``: the grid, validation of every member at once, dry runs, and a local sweep
bounded by ``--max-parallel`` (the SLURM job array is tested in test_cli_slurm.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.errors import UsageError
from cluster.sweep import parse_grid
from cluster.sweep_ops import array_throttle
from schemas.contract import STEP_PAUSE_ENV
from tests.support.cli import (
    assert_one_line_error,
    cli,
    run_cli,
    status_json,
    status_row,
    wait_status,
    write_spec,
)
from tests.support.cli import cluster_tiny_spec as tiny_spec
from tests.support.procs import wait_for
from tests.support.runs import fake_runs

NO_SBATCH = {"PATH": "/nonexistent", "CUDA_VISIBLE_DEVICES": ""}  # no SLURM, no GPU
GRID = ("--sweep", "optim.base_lr=2,4", "--sweep", "model.ppm_gamma=1,3")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"  # not created: commands that must write nothing leave it absent


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    return write_spec(tmp_path / "tiny.json", tiny_spec(tmp_path / "data", name=f"s{uuid.uuid4().hex[:8]}"))


def test_grid_is_every_combination_first_option_slowest() -> None:
    grid = parse_grid(["optim.base_lr=2.0, 4.0", "model.ppm_gamma=1,2,3"])
    assert [tuple(m.values()) for m in grid] == [(a, b) for a in ("2.0", "4.0") for b in ("1", "2", "3")]
    assert all(list(m) == ["optim.base_lr", "model.ppm_gamma"] for m in grid)
    for bad in (["optim.base_lr"], ["=1,2"], ["optim.base_lr=1,,2"], ["a=1", "a=2"], ["a=1,1"], []):
        with pytest.raises(UsageError):
            parse_grid(bad)


def test_values_split_outside_json_and_the_same_value_twice_is_refused() -> None:
    """A value is read as ``--set`` reads it: a comma inside JSON brackets, braces or a string does not
    split it, and two texts that resolve to one value (``2.0`` and ``2``) would be one job twice."""
    grid = parse_grid(["data.crop_scale=[0.2,1.0], [0.3,1.0]", 'name="a,b",{"k": [1, 2]},c'])
    assert [tuple(m.values()) for m in grid] == [
        (s, n) for s in ("[0.2,1.0]", "[0.3,1.0]") for n in ('"a,b"', '{"k": [1, 2]}', "c")
    ]
    assert len(parse_grid(["a=true,1,null,0"])) == 4  # JSON's true is not the number 1
    for same in ("2.0,2", "2.0,2.00", "2,2e0", "[0.2,1],[0.2,1.0]", 'x,"x"', '{"a":1,"b":2},{"b":2,"a":1}'):
        with pytest.raises(UsageError, match="listed twice"):
            parse_grid([f"optim.base_lr={same}"])
    for unbalanced in ("[0.2,1.0", "[0.2,1.0]],1", '"a,b'):
        with pytest.raises(UsageError, match="unbalanced"):
            parse_grid([f"data.crop_scale={unbalanced}"])


def test_a_list_valued_sweep_plans_one_member_per_list(
    home: Path, spec_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXPRO_HOME", str(home))
    code, out, err = run_cli(
        "submit", "--dry-run", "--json", "--executor", "local",
        "--sweep", "data.crop_scale=[0.2,1.0],[0.3,1.0]", str(spec_file),
    )  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert [m["spec"]["data"]["crop_scale"] for m in plan["members"]] == [[0.2, 1.0], [0.3, 1.0]]
    code, _, err = run_cli("submit", "--dry-run", "--sweep", "optim.base_lr=2.0,2", str(spec_file))
    assert code == 2 and err.count("\n") == 1 and "2.0 and 2: a value is listed twice" in err, err


@pytest.mark.parametrize(
    ("max_parallel", "active", "due", "throttle"),
    [(None, 0, 3, 3), (None, 2, 3, 3), (2, 0, 3, 2), (4, 1, 3, 3), (4, 3, 5, 1), (2, 2, 3, 1), (8, 0, 2, 2)],
)
def test_a_resumed_arrays_bound_is_what_max_parallel_leaves(
    max_parallel: int | None, active: int, due: int, throttle: int
) -> None:
    """Resumed on SLURM, the members are one array: no bound without --max-parallel, else what the
    members still queued or running leave of it (at least one, to make progress)."""
    assert array_throttle(max_parallel, active, due) == throttle


def test_bad_sweep_options_exit_2_and_write_nothing(home: Path, spec_file: Path) -> None:
    for args, word in (
        (["--sweep", "optim.base_lr"], "KEY.PATH=V1,V2"),
        (["--sweep", "optim.base_lr=1", "--sweep", "optim.base_lr=2"], "given twice"),
        (["--sweep", "optim.base_lr=1,2", "--max-parallel", "0"], "--max-parallel"),
        (["--max-parallel", "2"], "only with --sweep"),
        (["--sweep", "optim.base_lr=1,2", "--follow"], "--follow"),
    ):
        proc = cli("submit", "--executor", "local", *args, str(spec_file), home=home, env=NO_SBATCH)
        assert word in assert_one_line_error(proc, 2), args
    assert not home.exists()


def test_every_member_problem_is_reported_at_once_before_anything_is_written(
    home: Path, spec_file: Path
) -> None:
    proc = cli(
        "submit", "--executor", "local", "--sweep", "optim.base_lr=2,-1,x",
        "--sweep", "model.ppm_gamma=1,200", str(spec_file), home=home, env=NO_SBATCH,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    # members (-1,1) (-1,200) (x,1) (x,200) (2,200): one line per problem, each naming the member's values
    assert len(lines) == 7, lines
    assert all(ln.startswith("pixpro: sweep member optim.base_lr=") for ln in lines), lines
    assert sum("optim.base_lr=x model.ppm_gamma=200: optim.base_lr" in ln for ln in lines) == 1
    assert sum("optim.base_lr=2 model.ppm_gamma=200: model.ppm_gamma" in ln for ln in lines) == 1
    assert all("(from --sweep " in ln for ln in lines), lines
    assert not home.exists()


def test_members_share_resources_and_never_a_checkpoint_folder(
    home: Path, spec_file: Path, tmp_path: Path
) -> None:
    """Resources must be equal (one sbatch script); a checkpoint.url of the spec, which every member
    would share, becomes one folder per member below it."""
    proc = cli(
        "submit", "--executor", "local", "--sweep", "resources.cpus_per_task=1,2", str(spec_file),
        home=home, env=NO_SBATCH,
    )  # fmt: skip
    line = assert_one_line_error(proc, 2)
    assert "resources.cpus_per_task=2: resources differ" in line and "job array" in line
    shared = tiny_spec(tmp_path / "data", checkpoint__url=str(tmp_path / "ckpt"))
    spec = write_spec(tmp_path / "shared.json", shared)
    proc = cli(
        "submit", "--dry-run", "--json", "--executor", "local", "--sweep", "seed=1,2", str(spec),
        home=home, env=NO_SBATCH,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    members = json.loads(proc.stdout)["members"]
    urls = [m["spec"]["checkpoint"]["url"] for m in members]
    assert urls == [str(tmp_path / "ckpt" / m["run_id"]) for m in members] and len(set(urls)) == 2
    assert not home.exists()


def test_dry_run_lists_each_member_with_its_resolved_values_and_writes_nothing(
    home: Path, spec_file: Path
) -> None:
    proc = cli("submit", "--dry-run", "--executor", "local", *GRID, str(spec_file), home=home, env=NO_SBATCH)
    assert proc.returncode == 0, proc.stderr
    members = [ln for ln in proc.stdout.splitlines() if ln.startswith("# member ") and "  " in ln]
    assert [ln.split("  ", 1)[1] for ln in members] == [
        "optim.base_lr=2.0 model.ppm_gamma=1.0",
        "optim.base_lr=2.0 model.ppm_gamma=3.0",
        "optim.base_lr=4.0 model.ppm_gamma=1.0",
        "optim.base_lr=4.0 model.ppm_gamma=3.0",
    ]
    assert "# 4 members on this machine, 4 at a time" in proc.stdout and "# resolved spec" in proc.stdout

    # without sbatch a dry run previews SLURM: one array script, at most --max-parallel running
    proc = cli(
        "submit",
        "--dry-run",
        "--json",
        "--max-parallel",
        "2",
        *GRID,
        str(spec_file),
        home=home,
        env=NO_SBATCH,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (
        plan["executor"] == "slurm"
        and plan["max_parallel"] == 2
        and "#SBATCH --array=0-3%2" in plan["sbatch"]
    )
    assert [m["sweep_values"] for m in plan["members"]][1] == {"optim.base_lr": 2.0, "model.ppm_gamma": 3.0}
    specs = [m["spec"] for m in plan["members"]]
    assert [s["optim"]["base_lr"] for s in specs] == [2.0, 2.0, 4.0, 4.0]
    assert len({s["checkpoint"]["url"] for s in specs}) == 4  # each member its own run folder
    assert not home.exists()


def one_at_a_time(home: Path, spec_file: Path, sweep: str, **env: str) -> dict[str, Any]:
    """A local sweep with --max-parallel 1 (its runner starts the members); the submit's JSON."""
    proc = cli(
        "submit", "--json", "--executor", "local", "--no-preflight", "--max-parallel", "1",
        "--sweep", sweep, str(spec_file), home=home, env={"CUDA_VISIBLE_DEVICES": "", **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_sweep_runs_members_max_parallel_at_a_time_then_cancel_and_resume_skip_them(
    home: Path, spec_file: Path
) -> None:
    out = one_at_a_time(home, spec_file, "optim.base_lr=2,4", **{STEP_PAUSE_ENV: "0.3"})
    sweep_id, members = out["sweep_id"], out["members"]
    assert [m["sweep_values"] for m in members] == [{"optim.base_lr": 2.0}, {"optim.base_lr": 4.0}]
    assert [m["job_id"] for m in members] == [None, None]  # the sweep runner starts them
    first_id, second_id = (m["run_id"] for m in members)

    # cancelled while the first member runs (the second never starts), then resumed: one at a time still
    wait_status(home, first_id, lambda r: (r["step"] or 0) >= 3, 300)
    assert cli("cancel", sweep_id, home=home).returncode == 0
    wait_status(home, first_id, lambda r: r["state"] == "CANCELLED", 120)
    resume = cli("resume", sweep_id, "--json", home=home)
    assert resume.returncode == 0, resume.stderr
    resumed = json.loads(resume.stdout)
    assert [(r["run_id"], r["job_id"] is None) for r in resumed] == [(first_id, False), (second_id, True)]
    # the second waits for the first's slot from now on, then the sweep runner resumes it
    row = status_row(home, second_id)
    assert (row["state"], row["reason"]) == ("PENDING", "waits for a slot of its sweep"), row
    wait_status(home, first_id, lambda r: r["state"] == "COMPLETED", 300)
    wait_for("the second member's attempt", lambda: status_row(home, second_id)["attempts"], 120, 0.5)
    rows = [wait_status(home, m["run_id"], lambda r: r["state"] == "COMPLETED", 300) for m in members]
    assert [r["step"] for r in rows] == [20, 20]
    assert [len(r["attempts"]) for r in rows] == [2, 1], rows
    listed = status_json(home, sweep_id)
    assert [(r["run_id"], r["sweep_id"], r["sweep_values"]) for r in listed] == [
        (m["run_id"], sweep_id, m["sweep_values"]) for m in members
    ]
    # one at a time: the second member's attempt started after the first one's ended
    first, second = (
        json.loads((home / "runs" / r["run_id"] / "local" / f"{r['job_id']}.json").read_bytes()) for r in rows
    )
    assert second["started"] >= first["ended"], (first, second)
    spec = [json.loads((home / "runs" / r["run_id"] / "spec.json").read_bytes()) for r in rows]
    assert [s["optim"]["base_lr"] for s in spec] == [2.0, 4.0]

    table = cli("status", sweep_id, home=home)
    assert table.returncode == 0 and f"sweep {sweep_id}" in table.stdout and "optim.base_lr" in table.stdout
    assert "is a sweep: give a member's run id" in assert_one_line_error(cli("logs", sweep_id, home=home), 2)
    cancel = cli("cancel", sweep_id, home=home)
    assert cancel.returncode == 0 and cancel.stdout.count("nothing to cancel") == 2, cancel
    resume = cli("resume", sweep_id, home=home)
    assert resume.returncode == 0 and "every member completed" in resume.stdout, resume

    # an evaluation of every member in one command
    data = str(spec_file.parent / "data")
    proc = cli("eval", sweep_id, "--task", "knn", "--data", data, "--submit", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    assert [(e["run_id"], e["eval_id"]) for e in json.loads(proc.stdout)] == [
        (m["run_id"], "knn-1") for m in members
    ]
    for m in members:
        (ev,) = wait_status(home, m["run_id"], lambda r: r["evals"][0]["state"] != "RUNNING", 300)["evals"]
        assert ev["state"] == "COMPLETED" and ev["step"] == 20, ev
    assert "top-1" in cli("status", sweep_id, home=home).stdout  # the sweep table's EVAL column


def test_array_tasks_not_started_yet_share_one_squeue_and_sacct_line() -> None:
    from cluster import slurm

    assert slurm.array_ids("77_[0-2,5%2]") == ["77_0", "77_1", "77_2", "77_5"]
    assert slurm.array_ids("77_3") == ["77_3"] and slurm.array_ids("77_[x]") == ["77_[x]"]
    jobs = {j: slurm.SlurmJob(j) for j in ("77_0", "77_1", "77_2")}
    slurm.parse_squeue("77_0|RUNNING|None\n77_[1-2%1]|PENDING|JobArrayTaskLimit\n", jobs)
    assert [(j.queue_state, j.reason) for j in jobs.values()] == [
        ("RUNNING", ""),
        ("PENDING", "JobArrayTaskLimit"),
        ("PENDING", "JobArrayTaskLimit"),
    ]
    slurm.parse_sacct(
        "77_0|RUNNING|0:0|2026-12-05T10:00:00|Unknown\n77_[1-2%1]|PENDING|0:0|Unknown|Unknown\n", jobs
    )
    assert [j.current.state if j.current else None for j in jobs.values()] == [
        "RUNNING",
        "PENDING",
        "PENDING",
    ]


def test_an_array_task_names_its_attempts_by_the_id_its_run_record_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside an array task SLURM_JOB_ID is the task's own number; the record holds ``<array>_<index>``,
    which status matches against the trainer's attempt names (and scontrol requeue accepts)."""
    from cluster.node_task import JobContext

    env = {"SLURM_JOB_ID": "4713", "SLURM_ARRAY_JOB_ID": "4711", "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_RESTART_COUNT": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ctx = JobContext.from_slurm_env()
    assert (ctx.job_id, ctx.attempt) == ("4711_2", "4711_2.1")


def test_members_planned_in_one_second_never_share_a_run_id(
    monkeypatch: pytest.MonkeyPatch, spec_file: Path, home: Path
) -> None:
    from cluster import runs, sweep_ops

    drawn = iter(["same-id", "same-id", "other-id"])
    monkeypatch.setattr(runs, "new_run_id", lambda name: next(drawn))
    monkeypatch.setenv("PIXPRO_HOME", str(home))
    plan = sweep_ops.plan_sweep(
        spec_file, ["seed=1,2"], max_parallel=None, nodes=None, gpus=None, executor="local", dry_run=True
    )
    assert [p.run_id for p in plan.plans] == ["same-id", "other-id"]
    assert [p.spec.seed for p in plan.plans] == [1, 2] and not home.exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cancelling_a_local_sweep_keeps_its_runner_from_starting_the_rest(
    home: Path, spec_file: Path
) -> None:
    out = one_at_a_time(home, spec_file, "seed=1,2")
    first, second = out["members"]
    wait_status(home, first["run_id"], lambda r: r["state"] == "RUNNING", 120)
    assert status_json(home, second["run_id"])["state"] == "PENDING"
    # a member waiting for its slot is the runner's to start: a resume of the sweep leaves it
    early = cli("resume", out["sweep_id"], home=home)
    assert early.returncode == 0 and "still queued or running" in early.stdout, early
    cancel = cli("cancel", out["sweep_id"], home=home)
    assert cancel.returncode == 0 and cancel.stdout.count("cancelled run ") == 1, cancel
    wait_status(home, first["run_id"], lambda r: r["state"] == "CANCELLED", 120)
    runner = home / "sweeps" / out["sweep_id"] / "runner.log"
    wait_for("the sweep runner to finish", lambda: "1 member(s) of" in runner.read_text(), 60)
    row = status_json(home, second["run_id"])
    assert (row["state"], row["reason"], row["attempts"]) == ("CANCELLED", "before it started", []), row


def test_no_usage_error_waits_for_a_members_preflight(
    home: Path, spec_file: Path, tmp_path: Path, monkeypatch
) -> None:
    """Shared resources and each member's own checkpoint folder are checked before any preflight (seconds
    each): a refused sweep starts none."""
    from cluster import runs

    monkeypatch.setenv("PIXPRO_HOME", str(home))
    monkeypatch.setattr(runs, "run_preflight", lambda *a, **k: pytest.fail("a preflight was started"))
    code, _, err = run_cli(
        "submit", "--executor", "local", "--sweep", "resources.cpus_per_task=1,2", str(spec_file)
    )
    assert code == 2 and "resources.cpus_per_task=2: resources differ" in err, err
    taken = tmp_path / "ckpt"
    taken.mkdir()
    (taken / "run.json").write_text('{"run_id": "other-run-1234"}')
    spec = write_spec(tmp_path / "taken.json", tiny_spec(tmp_path / "data", checkpoint__url=str(taken)))
    code, _, err = run_cli("submit", "--executor", "local", "--sweep", "seed=1", str(spec))
    assert code == 2 and err == (
        f"pixpro: sweep member seed=1: checkpoint.url {taken} already holds run other-run-1234: "
        "resume it with: pixpro resume other-run-1234\n"
    ), err
    assert not home.exists()


def test_a_member_resumed_after_its_turn_shows_pending_for_a_slot_at_once(
    home: Path, spec_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pixpro resume SWEEP`` beyond ``--max-parallel`` on the local executor: a member cancelled before
    it started is queued for the sweep runner, and status shows it ``PENDING (waits for a slot of its
    sweep)`` from then on, not ``CANCELLED (before it started)`` until the runner resumes it. A cancel
    after the resume marks it again; a runner that could not be started leaves it cancelled."""
    from cluster import runs, sweep_runner
    from cluster.sweep import find_sweep
    from cluster.sweep_ops import resume_sweep

    monkeypatch.setenv("PIXPRO_HOME", str(home))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    runners: list[list[str] | None] = []
    monkeypatch.setattr(sweep_runner, "spawn_sweep_runner", lambda d, resume=None: runners.append(resume))
    monkeypatch.setattr(sweep_runner, "runner_alive", lambda sweep_dir: bool(runners))  # as the real one
    rc, out, err = run_cli(
        "submit", "--json", "--executor", "local", "--no-preflight", "--max-parallel", "1",
        "--sweep", "optim.base_lr=2,4", str(spec_file),
    )  # fmt: skip
    assert rc == 0, err
    sweep_id = json.loads(out)["sweep_id"]
    first, second = (m["run_id"] for m in json.loads(out)["members"])
    assert run_cli("cancel", sweep_id)[0] == 0  # before the (absent) runner started either
    before = ("CANCELLED", "before it started")
    assert [(r["state"], r["reason"]) for r in (status_row(home, first), status_row(home, second))] == [
        before,
        before,
    ]
    # the first takes the one slot now (its attempt is not what this test is about: none starts)
    monkeypatch.setattr(runs, "resume", lambda run_id: (None, f"local-of-{run_id}", None))
    rc, out, err = run_cli("resume", sweep_id)
    assert rc == 0 and f"run {second} resumes when fewer than 1 members run" in out, (out, err)
    assert runners[-1] == [second]
    row = status_row(home, second)
    assert (row["state"], row["reason"], row["attempts"]) == ("PENDING", "waits for a slot of its sweep", [])

    assert run_cli("cancel", sweep_id)[0] == 0  # the runner finds the new mark and leaves it
    assert sweep_runner._resume(second) is None  # also when it starts only after the cancel
    row = status_row(home, second)
    assert (row["state"], row["reason"]) == before

    def no_runner(sweep_dir: Path, resume: list[str] | None = None) -> int:
        raise OSError("no runner")

    monkeypatch.setattr(sweep_runner, "spawn_sweep_runner", no_runner)
    sweep = find_sweep(sweep_id)
    assert sweep is not None
    with pytest.raises(OSError, match="no runner"):
        resume_sweep(sweep)
    row = status_row(home, second)
    assert (row["state"], row["reason"]) == before


def test_a_member_waiting_for_its_first_slot_can_be_cancelled_alone(
    home: Path, spec_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pixpro cancel MEMBER`` of a local sweep member the runner has not started yet: it says so, and
    the runner leaves it (it used to say "nothing to cancel" and start it anyway)."""
    from cluster import sweep_runner

    _, (_, second) = local_sweep(home, spec_file, monkeypatch, 1, "optim.base_lr=2,4")
    rc, out, err = run_cli("cancel", second)
    assert (rc, out) == (0, f"cancelled run {second} before it started\n"), err
    row = status_row(home, second)
    assert (row["state"], row["reason"]) == ("CANCELLED", "before it started")
    assert sweep_runner._start_first(second) is None  # its turn comes: left out


def test_a_set_of_a_swept_key_is_refused(home: Path, spec_file: Path) -> None:
    """``--set`` (or ``--gpus``, ``--nodes``) of the key a ``--sweep`` sets: one of the two would silently
    overrule the other."""
    for grid, given, words in (
        ("optim.base_lr=2,4", ("--set", "optim.base_lr=3"),
         "--set optim.base_lr: the sweep sets optim.base_lr (--sweep optim.base_lr=...)"),
        ("resources.gpus_per_node=1,2", ("--gpus", "0"), "--gpus: the sweep sets resources.gpus_per_node"),
    ):  # fmt: skip
        args = ("submit", "--dry-run", "--executor", "local", "--sweep", grid, *given, str(spec_file))
        line = assert_one_line_error(cli(*args, home=home), 2)
        assert words in line, line


@pytest.mark.cluster
def test_the_options_and_the_cluster_are_refused_in_one_round(home: Path, spec_file: Path) -> None:
    """A missing ``--eval-data`` and more GPUs than the partition has: both lines at once, not one per try."""
    proc = cli(
        "submit", "--dry-run", "--executor", "slurm", "--sweep", "optim.base_lr=2,4", "--gpus", "8",
        "--eval", "knn", "--eval-data", "nope", str(spec_file), home=home,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--eval-data: data folder nope does not exist" in proc.stderr, proc.stderr
    assert "--gpus 8" in proc.stderr, proc.stderr


def test_a_local_members_state_follows_its_sweeps_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member the runner is to resume shows PENDING (waits for a slot), not its last attempt's
    CANCELLED; one never started whose runner is gone says so instead of waiting forever."""
    from cluster import sweep_runner
    from cluster.attempts import AttemptState
    from cluster.status import run_state
    from cluster.sweep import sweeps_dir

    home = tmp_path / "home"
    monkeypatch.setenv("PIXPRO_HOME", str(home))
    record = fake_runs(home, 2)[1]  # local
    record.sweep_id = "sweep-x"
    folder = sweeps_dir() / "sweep-x"
    folder.mkdir(parents=True)
    (folder / sweep_runner.RUNNER_FILE).write_text(json.dumps({"pid": 1, "resume": [record.run_id]}))
    alive = [True]
    monkeypatch.setattr(sweep_runner, "runner_alive", lambda sweep_dir: alive[0])
    cancelled = {record.attempts[-1]: AttemptState("CANCELLED")}
    assert run_state(record, cancelled) == AttemptState("PENDING", "waits for a slot of its sweep")
    record.paths.cancel_marker.write_text("0\n")  # cancelled again after the resume: the runner leaves it
    assert run_state(record, cancelled).state == "CANCELLED"
    record.paths.cancel_marker.unlink()
    alive[0] = False
    assert run_state(record, cancelled).state == "CANCELLED"  # no runner: nothing will resume it
    record.attempts = []
    assert run_state(record, {}) == AttemptState(
        "UNKNOWN", "its sweep's runner ended before it: pixpro resume sweep-x"
    )


def test_the_runner_waits_out_a_member_lock_held_long(
    home: Path, spec_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A member's lock held past the wait (a ``pixpro resume`` stopped with Ctrl-Z): the runner says so
    and tries again at its next poll, instead of dying with the members after it never started."""
    from cluster import record as record_mod
    from cluster import sweep_runner
    from cluster.index import Index
    from cluster.sweep import sweeps_dir

    sweep_id, (first, *others) = local_sweep(home, spec_file, monkeypatch, 2, "optim.base_lr=2,4,8")
    started: list[str] = []
    monkeypatch.setattr(
        sweep_runner, "_start_first", lambda run_id: started.append(run_id) or f"job-{run_id}"
    )
    monkeypatch.setattr(sweep_runner, "POLL_S", 0.05)
    monkeypatch.setattr(record_mod, "LOCK_WAIT_S", 0.1)
    with held_elsewhere(Index().find(first).paths.start_lock, 1.0):
        assert sweep_runner.main([str(sweeps_dir() / sweep_id)]) == 0
    assert sorted(started) == sorted([first, *others])
    assert (
        f"not yet {first}: run {first} is being resumed or cancelled by another pixpro"
        in capsys.readouterr().out
    )


def test_a_sweep_resume_decides_under_every_members_lock(
    home: Path, spec_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pixpro resume SWEEP`` holds every member's lock from reading their states to queueing them: a
    member another pixpro is resuming or cancelling at that moment is waited for, not queued twice (or
    un-cancelled) from states read before."""
    from cluster import record as record_mod
    from cluster.index import Index

    sweep_id, (first, second) = local_sweep(home, spec_file, monkeypatch, 1, "optim.base_lr=2,4")
    assert run_cli("cancel", sweep_id)[0] == 0
    monkeypatch.setattr(record_mod, "LOCK_WAIT_S", 0.2)
    with held_elsewhere(Index().find(second).paths.start_lock, 3.0):
        rc, out, err = run_cli("resume", sweep_id)
    assert rc == 1 and f"run {second} is being resumed or cancelled by another pixpro" in err, (out, err)
    # nothing queued from states read around it: not even the member whose lock was free
    assert [status_row(home, r)["state"] for r in (first, second)] == ["CANCELLED", "CANCELLED"]


@contextlib.contextmanager
def held_elsewhere(lock: Path, seconds: float) -> Iterator[None]:
    """``lock`` held by another process (flock(1)) for ``seconds`` at most, or until the block ends."""
    holder = subprocess.Popen(["flock", str(lock), "sleep", str(seconds)])
    try:
        free = lambda: subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0  # noqa: E731
        wait_for("the lock to be held", lambda: not free(), 10, 0.02)
        yield
    finally:
        holder.kill()
        holder.wait()


def local_sweep(
    home: Path, spec_file: Path, monkeypatch: pytest.MonkeyPatch, max_parallel: int, grid: str
) -> tuple[str, list[str]]:
    """A local sweep submitted in-process whose runner never starts (nothing trains): its id and its
    members' run ids, in order."""
    from cluster import sweep_runner

    monkeypatch.setenv("PIXPRO_HOME", str(home))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(sweep_runner, "spawn_sweep_runner", lambda d, resume=None: 0)
    rc, out, err = run_cli(
        "submit", "--json", "--executor", "local", "--no-preflight", "--max-parallel", str(max_parallel),
        "--sweep", grid, str(spec_file),
    )  # fmt: skip
    assert rc == 0, err
    return json.loads(out)["sweep_id"], [m["run_id"] for m in json.loads(out)["members"]]
