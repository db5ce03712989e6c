"""``pixpro status`` reads SLURM's accounting right, with slurmdbd and with the jobcomp fallback.

Two parts:

- Recorded output (tests/data/slurm-states-*.txt, made by cluster/slurm/record_states.py on the local
  cluster in each mode): the exact ``squeue`` and ``sacct -D`` text of jobs driven through never ran,
  running, ``scontrol requeue`` twice, partition preemption, cancel, TIMEOUT and a node set DOWN
  (requeued and --no-requeue jobs), parsed by ``cluster.slurm`` and judged by ``cluster.attempts``.
- Live: the running test cluster (``cluster/slurm/setup.sh``, either mode) and a second cluster in the
  other mode, started here on other ports in a temporary folder: a job that never ran, a first run,
  two requeues (restart 1, restart 2, SLURM's own Restarts count) and a cancel, through
  ``cluster.slurm.query`` as ``pixpro status`` calls it. ~1 min.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import slurm
from cluster.attempts import ACTIVE, STATES, AttemptState, slurm_state
from tests.support.procs import wait_for

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
MAIN_DIR = Path(os.environ.get("PIXPRO_SLURM_DIR") or "/var/lib/pixpro-slurm")
OTHER_PORT_BASE = int(os.environ.get("PIXPRO_TEST_SLURM_OTHER_PORT_BASE", "7817"))
MODES = ("slurmdbd", "jobcomp")


# ----------------------------------------------------------------------------------------- recorded
def recording(mode: str) -> list[tuple[str, dict[str, str], str, str]]:
    """(label, {role: job id}, squeue text, sacct text) per snapshot of a recording."""
    out = []
    for block in (DATA / f"slurm-states-{mode}.txt").read_text().split("\n## ")[0:]:
        block = block.removeprefix("## ")
        head, _, rest = block.partition("\n")
        label, _, roles = head.partition(" ")
        squeue, _, sacct = rest.removeprefix("### squeue\n").partition("### sacct\n")
        out.append((label, json.loads(roles), squeue, sacct))
    return out


def states_of(roles: dict[str, str], squeue: str, sacct: str) -> dict[str, AttemptState]:
    jobs = {j: slurm.SlurmJob(j) for j in roles.values()}
    slurm.parse_squeue(squeue, jobs)
    slurm.parse_sacct(sacct, jobs)
    return {role: slurm_state(jobs[j], None, cancelled=False, recent=False) for role, j in roles.items()}


# (state, reason, history) per snapshot and role; the same in both modes.
RUN = ("RUNNING", "", ())
EXPECTED: dict[str, dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "started": {
        "never_ran": ("PENDING", "BeginTime", ()),  # not REQUEUED: it never ran
        "running": RUN,  # a first run: no "restart" note
        "requeued": RUN,
        "cancelled": RUN,
        "timeout": RUN,
        "preempted": RUN,
        "node_fail_requeue": RUN,
    },
    "requeued_once_pending": {
        "never_ran": ("PENDING", "BeginTime", ()),
        "requeued": ("REQUEUED", "BeginTime", ("REQUEUED",)),
        "cancelled": ("CANCELLED", "", ("CANCELLED",)),
    },
    "requeued_once_running": {"requeued": ("RUNNING", "restart 1", ("REQUEUED",))},
    "requeued_twice_pending": {
        "requeued": ("REQUEUED", "BeginTime", ("REQUEUED", "REQUEUED")),
        "running": RUN,
    },
    "preempted_pending": {"preempted": ("REQUEUED", "BeginTime, preempted", ("PREEMPTED",))},
    "requeued_twice_running": {
        "requeued": ("RUNNING", "restart 2", ("REQUEUED", "REQUEUED")),
        "preempted": ("RUNNING", "restart 1", ("PREEMPTED",)),
    },
    "timed_out": {"timeout": ("TIMEOUT", "", ("TIMEOUT",)), "running": RUN},
    "node_failed": {
        "node_fail_requeue": ("NODE_FAIL", "requeued, BeginTime", ("NODE_FAIL",)),
        "running": ("NODE_FAIL", "requeued, BeginTime", ("NODE_FAIL",)),
        "requeued": ("NODE_FAIL", "requeued, BeginTime", ("REQUEUED", "REQUEUED", "NODE_FAIL")),
        "node_fail": ("FAILED", "NODE_FAIL", ("NODE_FAIL",)),  # --no-requeue: the job is over
        "preempted": ("RUNNING", "restart 1", ("PREEMPTED",)),
        "timeout": ("TIMEOUT", "", ("TIMEOUT",)),
        "never_ran": ("PENDING", "BeginTime", ()),
    },
    "node_failed_running_again": {
        "node_fail_requeue": ("RUNNING", "restart 1", ("NODE_FAIL",)),
        "requeued": ("RUNNING", "restart 3", ("REQUEUED", "REQUEUED", "NODE_FAIL")),
        "node_fail": ("FAILED", "NODE_FAIL", ("NODE_FAIL",)),
    },
    "all_cancelled": {
        "never_ran": ("CANCELLED", "", ("CANCELLED",)),
        "running": ("CANCELLED", "", ("NODE_FAIL", "CANCELLED")),
        "requeued": ("CANCELLED", "", ("REQUEUED", "REQUEUED", "NODE_FAIL", "CANCELLED")),
        "cancelled": ("CANCELLED", "", ("CANCELLED",)),
        "timeout": ("TIMEOUT", "", ("TIMEOUT",)),
        "preempted": ("CANCELLED", "", ("PREEMPTED", "CANCELLED")),
        "node_fail_requeue": ("CANCELLED", "", ("NODE_FAIL", "CANCELLED")),
        "node_fail": ("FAILED", "NODE_FAIL", ("NODE_FAIL",)),
    },
}


@pytest.mark.parametrize("mode", MODES)
def test_recorded_states(mode: str) -> None:
    snaps = recording(mode)
    assert [label for label, *_ in snaps] == list(EXPECTED), "recording and expectations out of step"
    for label, roles, squeue, sacct in snaps:
        got = states_of(roles, squeue, sacct)
        for role, (state, reason, history) in EXPECTED[label].items():
            st = got[role]
            assert (st.state, st.reason, st.history) == (state, reason, history), (mode, label, role, st)
            assert st.state in STATES and st.active == (state in ACTIVE)


@pytest.mark.parametrize("mode", MODES)
def test_recorded_states_without_squeue(mode: str) -> None:
    """squeue failed (slurmctld busy) or forgot the job: sacct alone still says what it can."""
    _, roles, _, sacct = recording(mode)[-1]
    got = states_of(roles, "", sacct)
    assert got["requeued"].state == "CANCELLED" and got["preempted"].state == "CANCELLED"
    assert got["node_fail"].label() == "FAILED (NODE_FAIL)" and got["timeout"].state == "TIMEOUT"
    _, roles, _, sacct = recording(mode)[EXPECTED_INDEX["requeued_twice_running"]]
    got = states_of(roles, "", sacct)
    if mode == "slurmdbd":  # the current run's record: RUNNING, with the earlier runs counted
        assert got["requeued"].label() == "RUNNING (restart 2)", got["requeued"]
        assert got["never_ran"].state == "PENDING", got["never_ran"]
    else:  # jobcomp logs ended runs only
        assert got["requeued"].state == "PREEMPTED" and got["never_ran"].state == "UNKNOWN"


EXPECTED_INDEX = {label: i for i, label in enumerate(EXPECTED)}


def test_trainer_preemption_is_never_failed_with_duplicates() -> None:
    """exit 75 or status.json "preempted" wins over SLURM's FAILED, also after earlier requeues."""
    line = (
        "77|REQUEUED|0:0|2026-01-01T00:00:00|2026-01-01T00:01:00\n"
        "77|FAILED|75:0|2026-01-01T00:01:20|2026-01-01T00:02:00\n"
    )
    jobs = {"77": slurm.SlurmJob("77")}
    slurm.parse_sacct(line, jobs)
    st = slurm_state(jobs["77"], None, cancelled=False, recent=False)
    assert (st.state, st.history) == ("PREEMPTED", ("REQUEUED", "FAILED"))
    line = line.replace("75:0", "1:0")
    jobs = {"77": slurm.SlurmJob("77")}
    slurm.parse_sacct(line, jobs)
    trainer = {"state": "preempted", "attempt": "77.1"}
    assert slurm_state(jobs["77"], trainer, cancelled=False, recent=False).state == "PREEMPTED"
    assert slurm_state(jobs["77"], None, cancelled=False, recent=False).state == "FAILED"


def test_records_of_an_older_job_with_the_same_id_are_dropped() -> None:
    text = "5|COMPLETED|0:0|2020-01-01T00:00:00|2020-01-01T00:01:00\n5|PENDING|0:0|Unknown|Unknown\n"
    jobs = {"5": slurm.SlurmJob("5")}
    slurm.parse_sacct(text, jobs, {"5": time.time() - 10})
    assert jobs["5"].history == [] and jobs["5"].current is not None
    assert slurm_state(jobs["5"], None, cancelled=False, recent=True).state == "PENDING"


# ----------------------------------------------------------------------------------------- live
def main_mode() -> str:
    conf = Path(os.environ.get("SLURM_CONF") or MAIN_DIR / "etc/slurm.conf")
    if not conf.is_file():
        pytest.fail(f"no test cluster ({conf} missing): run cluster/slurm/setup.sh as root", pytrace=False)
    return "slurmdbd" if "accounting_storage/slurmdbd" in conf.read_text() else "jobcomp"


def env_for(slurm_dir: Path) -> dict[str, str]:
    path = [p for p in os.environ.get("PATH", "").split(":") if p and not p.endswith("pixpro-slurm/bin")]
    path = [p for p in path if p != str(MAIN_DIR / "bin")]
    return {
        "SLURM_CONF": str(slurm_dir / "etc/slurm.conf"),
        "PATH": ":".join([str(slurm_dir / "bin"), *path]),
    }


@pytest.fixture(scope="module", params=["main", "other"])
def cluster_env(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """(mode, environment) of the running test cluster, then of a second one in the other mode."""
    mode = main_mode()
    if request.param == "main":
        yield (
            mode,
            env_for(Path(os.environ["SLURM_CONF"]).parents[1] if "SLURM_CONF" in os.environ else MAIN_DIR),
        )
        return
    other = "jobcomp" if mode == "slurmdbd" else "slurmdbd"
    path = Path(tempfile.mkdtemp(prefix=f"pixpro-slurm-{other}-", dir="/tmp"))  # munge/mysql must enter it
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PIXPRO_SLURM_"))},
        "PIXPRO_SLURM_DIR": str(path),
        "PIXPRO_SLURM_ACCOUNTING": other,
        "PIXPRO_SLURM_PORT_BASE": str(OTHER_PORT_BASE),
        "PIXPRO_SLURM_CPUS": "2",
        "PIXPRO_SLURM_GPUS": "0",
    }
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "cluster/slurm/setup.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, f"second cluster ({other}) did not start: {proc.stderr[-3000:]}"
        yield other, env_for(path)
    finally:
        subprocess.run(["bash", str(REPO / "cluster/slurm/stop.sh"), "--cancel-jobs"], env=env,
                       capture_output=True, timeout=120)  # fmt: skip
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_status_through_two_requeues_and_cancel(
    cluster_env: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mode, env = cluster_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # slurm.query runs squeue/sacct with this environment

    def sh(*args: str) -> str:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        return proc.stdout

    def sbatch(*args: str) -> str:
        return sh("sbatch", "--parsable", "-o", "/dev/null", *args).strip().split(";")[0]

    never = sbatch("--begin=now+3600", "-t", "5", "--wrap", "true")
    job = sbatch("-t", "5", "--requeue", "--wrap", "sleep 300")
    submitted = {never: time.time() - 1, job: time.time() - 1}
    seen: list[str] = []

    def state(job_id: str) -> AttemptState:
        jobs, warnings = slurm.query([never, job], submitted)
        assert not warnings, (mode, warnings)
        st = slurm_state(jobs[job_id], None, cancelled=False, recent=True)
        seen.append(f"{job_id}:{st.label()}:{','.join(st.history)}")
        return st

    def restarts() -> int:
        out = sh("scontrol", "show", "job", "-o", job)
        return int(next(f for f in out.split() if f.startswith("Restarts=")).split("=")[1])

    def reaches(job_id: str, label: str, history: tuple[str, ...], timeout: float = 60) -> None:
        def ok() -> bool:
            st = state(job_id)
            return st.label() == label and st.history == history

        wait_for(f"{mode}: {job_id} {label} {history} (seen {seen[-3:]})", ok, timeout)

    try:
        reaches(job, "RUNNING", ())  # a first run: no restart note
        never_st = state(never)
        assert (never_st.state, never_st.reason, never_st.history) == ("PENDING", "BeginTime", ()), never_st
        # squeue's expected start (what squeue --start shows): the --begin time, an hour from now
        assert never_st.expected_start is not None and 3000 < never_st.expected_start - time.time() < 3700
        assert state(job).expected_start is None and state(job).requeues == 0
        for n in (1, 2):
            sh("scontrol", "requeue", job)
            wait_for("the job pending again", lambda: state(job).state == "REQUEUED", 120)
            assert state(job).history == ("REQUEUED",) * n, (mode, seen[-3:])
            reaches(job, f"RUNNING (restart {n})", ("REQUEUED",) * n)
            assert restarts() == n == state(job).requeues  # SLURM's own count agrees
        sh("scancel", job, never)
        reaches(job, "CANCELLED", ("REQUEUED", "REQUEUED", "CANCELLED"))
        assert state(job).requeues == 2  # the last run ended: it was not requeued
        reaches(never, "CANCELLED", ("CANCELLED",))
    finally:
        subprocess.run(["scancel", job, never], capture_output=True, timeout=30)
