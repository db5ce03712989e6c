"""Tests of the real local SLURM cluster that `cluster/slurm/setup.sh` brings up.

They submit real jobs: two nodes (node1, node2) with fake GPUs, the `cpu` (preemptible) and `high`
partitions, job history through sacct (slurmdbd, or the jobcomp/filetxt wrapper), and real
partition preemption with requeue. CI runs `cluster/slurm/setup.sh` (as root) before pytest; without
a cluster these tests fail (never skip) and say so.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tests.support.procs import wait_for

pytestmark = [pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]
SETUP_HINT = f"run `{REPO / 'cluster/slurm/setup.sh'}` as root first (it installs and starts local SLURM)"
NODES = ("node1", "node2")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}

_submitted: list[str] = []


# ----------------------------------------------------------------------------------------- helpers
def run(*args: str, check: bool = True, timeout: float = 30, cwd: Path | None = None) -> CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {detail}")
    return proc


def sbatch(*args: str, cwd: Path) -> str:
    out = run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip()
    job_id = out.split(";")[0]
    assert job_id.isdigit(), f"unexpected sbatch output {out!r}"
    _submitted.append(job_id)
    return job_id


def squeue_state(job_id: str) -> str:
    """RUNNING/PENDING/COMPLETING/... while slurmctld knows the job, '' otherwise."""
    proc = run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def sacct_lines(job_id: str) -> list[tuple[str, str, str]]:
    """(JobID, State, ExitCode) per run of the job, oldest first: `sacct -D -X` (slurmdbd: every run,
    no steps; jobcomp: the wrapper adds --completion, one line per ended run). "CANCELLED by 0" is
    read as CANCELLED."""
    out = run("sacct", "-D", "-X", "-j", job_id, "--format=JobID,State,ExitCode", "-P", "-n").stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return [(j, (s.split() or [""])[0], e) for j, s, e in rows]


def wait_finished(job_id: str, timeout: float) -> list[tuple[str, str, str]]:
    def done() -> list[tuple[str, str, str]] | None:
        lines = sacct_lines(job_id)
        if lines and lines[-1][1] in TERMINAL and squeue_state(job_id) in ("", *TERMINAL):
            return lines
        return None

    return wait_for(f"job {job_id} to finish (squeue: {squeue_state(job_id)!r})", done, timeout)  # type: ignore[return-value]


def write_script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.fail(f"SLURM client commands (sinfo, sbatch) are not installed: {SETUP_HINT}", pytrace=False)
    proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.fail(f"slurmctld does not answer ({proc.stderr.strip()}): {SETUP_HINT}", pytrace=False)
    yield
    # Cancel everything this module submitted, whatever state the tests left it in.
    if _submitted:
        subprocess.run(["scancel", *_submitted], capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(squeue_state(j) for j in _submitted):
            time.sleep(0.5)


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.timeout(60)
def test_two_nodes_up_with_two_gpus_each() -> None:
    def nodes() -> dict[str, dict[str, str]] | None:
        out = run("sinfo", "-h", "-N", "-o", "%N|%T|%G|%c|%m|%P").stdout
        table: dict[str, dict[str, str]] = {}
        for line in out.splitlines():
            name, state, gres, cpus, mem, part = line.split("|")
            row = table.setdefault(name, dict(state=state, gres=gres, cpus=cpus, mem=mem, parts=""))
            row["parts"] += part + " "
        return table if all(table.get(n, {}).get("state") == "idle" for n in NODES) else None

    try:
        table = wait_for("both nodes idle", nodes, timeout=120)
    except AssertionError:
        # Busy with other people's jobs is fine; down/drained/unknown is not.
        raw = run("sinfo", "-h", "-N", "-o", "%N|%T").stdout
        states = dict(line.split("|") for line in raw.splitlines())
        up = ("idle", "mixed", "allocated", "completing")
        bad = {n: s for n, s in states.items() if not s.startswith(up)}
        pytest.fail(f"nodes not idle: {states} (bad: {bad}); rerun cluster/slurm/setup.sh or check its logs")
    assert isinstance(table, dict)
    assert set(NODES) <= set(table), table
    for n in NODES:
        assert table[n]["gres"].startswith("gpu:2"), table[n]
        assert int(table[n]["cpus"]) >= 4, table[n]
        assert int(table[n]["mem"]) >= 4000, table[n]
        assert set(table[n]["parts"].split()) == {"cpu*", "high"}, table[n]

    partitions = {}
    for line in run("scontrol", "show", "partition", "-o").stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        partitions[fields["PartitionName"]] = fields
    cpu, high = partitions["cpu"], partitions["high"]
    keys = ("Default", "PriorityTier", "PreemptMode", "GraceTime")
    assert [cpu[k] for k in keys] == ["YES", "1", "REQUEUE", "20"], cpu
    assert [high[k] for k in keys[:3]] == ["NO", "10", "OFF"], high
    config = run("scontrol", "show", "config").stdout
    assert "preempt/partition_prio" in config
    assert "preempt_send_user_signal" in config


@pytest.mark.timeout(60)
def test_two_node_job_runs_one_task_per_node_and_sacct_reports_completed(shared_dir: Path) -> None:
    script = write_script(
        shared_dir / "two_nodes.sh",
        """
        #!/bin/bash
        srun hostname
        srun bash -c 'echo "node=$SLURMD_NODENAME procid=$SLURM_PROCID"'
        """,
    )
    out_pattern = f"{shared_dir}/%j.out"
    job = sbatch("-N", "2", "--ntasks-per-node=1", "-t", "2", "-o", out_pattern, str(script), cwd=shared_dir)
    lines = wait_finished(job, timeout=120)
    out = (shared_dir / f"{job}.out").read_text()
    assert sorted(line for line in out.splitlines() if line.startswith("node=")) == [
        "node=node1 procid=0",
        "node=node2 procid=1",
    ], out
    hostnames = [line for line in out.splitlines() if line and not line.startswith("node=")]
    assert len(hostnames) == 2, out  # one `srun hostname` task per node (both nodes are this machine)
    assert lines == [(job, "COMPLETED", "0:0")], lines


@pytest.mark.timeout(60)
def test_sacct_reports_failed_exit_code(shared_dir: Path) -> None:
    job = sbatch("-t", "1", "-o", f"{shared_dir}/%j.out", "--wrap", "exit 3", cwd=shared_dir)
    assert wait_finished(job, timeout=120) == [(job, "FAILED", "3:0")]


@pytest.mark.timeout(60)
def test_gpu_jobs_see_cuda_visible_devices(shared_dir: Path) -> None:
    one = sbatch(
        "-N", "1", "--gpus-per-node=1", "-t", "1", "-o", f"{shared_dir}/%j.out",
        "--wrap", 'echo "batch=$CUDA_VISIBLE_DEVICES"; srun bash -c \'echo "step=$CUDA_VISIBLE_DEVICES"\'',
        cwd=shared_dir,
    )  # fmt: skip
    two = sbatch(
        "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=2", "-t", "1", "-o", f"{shared_dir}/%j.out",
        "--wrap", "srun bash -c 'echo \"$SLURMD_NODENAME=$CUDA_VISIBLE_DEVICES\"'",
        cwd=shared_dir,
    )  # fmt: skip
    assert wait_finished(one, timeout=120)[-1][1] == "COMPLETED"
    assert wait_finished(two, timeout=120)[-1][1] == "COMPLETED"
    assert (shared_dir / f"{one}.out").read_text().split() == ["batch=0", "step=0"]
    assert sorted((shared_dir / f"{two}.out").read_text().split()) == ["node1=0,1", "node2=0,1"]

    # More GPUs than a node has: refused at submit time, not queued forever.
    proc = run("sbatch", "--gpus-per-node=3", "-t", "1", "--wrap", "true", check=False, cwd=shared_dir)
    assert proc.returncode != 0, proc.stdout
    assert "not available" in proc.stderr or "Invalid" in proc.stderr, proc.stderr


@pytest.mark.timeout(150)
def test_high_partition_preempts_and_requeues_cpu_job(shared_dir: Path) -> None:
    d = shared_dir
    # The step (not the batch shell) receives --signal=USR2 without "B:"; it records it and keeps going
    # so that SLURM itself ends and requeues the job after GraceTime.
    step = write_script(
        d / "step.sh",
        f"""
        #!/bin/bash
        trap 'echo "usr2 job=$SLURM_JOB_ID restart=${{SLURM_RESTART_COUNT:-0}}" >> {d}/usr2-marker' USR2
        touch {d}/step-ready-${{SLURM_RESTART_COUNT:-0}}
        while :; do sleep 1 & wait $!; done
        """,
    )
    victim_script = write_script(
        d / "victim.sh",
        f"""
        #!/bin/bash
        #SBATCH -p cpu
        #SBATCH --requeue
        #SBATCH --signal=USR2@30
        #SBATCH -t 10
        #SBATCH -o {d}/victim-%j.out
        #SBATCH --open-mode=append
        echo "job=$SLURM_JOB_ID restart=${{SLURM_RESTART_COUNT:-0}}" > {d}/start-${{SLURM_RESTART_COUNT:-0}}
        srun -n1 {step}
        """,
    )
    victim = sbatch(str(victim_script), cwd=d)
    wait_for("the victim's step to start", lambda: (d / "step-ready-0").exists(), timeout=120, interval=0.2)
    assert (d / "start-0").read_text().split() == [f"job={victim}", "restart=0"]
    assert squeue_state(victim) == "RUNNING"

    # A job in the high partition that needs both whole nodes.
    high = sbatch("-p", "high", "-N", "2", "--exclusive", "-t", "2", "-o", f"{d}/high-%j.out",
                  "--wrap", "echo high on $SLURM_JOB_NODELIST", cwd=d)  # fmt: skip
    marker = d / "usr2-marker"
    wait_for("USR2 to reach the preempted job", marker.exists, timeout=120, interval=0.2)
    assert marker.read_text().split()[:3] == ["usr2", f"job={victim}", "restart=0"]

    # After GraceTime (checked on slurmctld's ~30 s tick) the victim is killed and requeued, high runs.
    high_lines = wait_finished(high, timeout=120)
    assert high_lines[-1][1] == "COMPLETED", high_lines
    assert (d / f"high-{high}.out").read_text().strip() == "high on node[1-2]"
    assert sacct_lines(victim)[0][:2] == (victim, "PREEMPTED"), sacct_lines(victim)

    # The same job id starts again with SLURM_RESTART_COUNT=1 (requeued jobs wait ~10 s: cred_expire).
    wait_for("the requeued victim to start again", (d / "start-1").exists, timeout=120, interval=0.5)
    assert (d / "start-1").read_text().split() == [f"job={victim}", "restart=1"]
    wait_for("the requeued victim's step", (d / "step-ready-1").exists, timeout=120, interval=0.2)
    assert squeue_state(victim) == "RUNNING"
    assert "PREEMPTION" in (d / f"victim-{victim}.out").read_text()

    run("scancel", victim)
    lines = wait_finished(victim, timeout=120)
    assert [state for _, state, _ in lines] == ["PREEMPTED", "CANCELLED"], lines
    assert {job for job, _, _ in lines} == {victim}
