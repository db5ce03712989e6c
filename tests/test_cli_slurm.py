"""End-to-end tests of ``pixpro`` on the real local SLURM cluster (and a moto S3 server).

Every test submits real jobs through the console script: two nodes, torchrun rendezvous across them,
real partition preemption, ``scontrol requeue``, ``scancel --signal=USR2``, ``pixpro cancel`` and
``pixpro resume``. Each interrupted run must end bitwise equal to an uninterrupted one (CPU, fp32,
one thread per rank). Without a running cluster they fail and say how to start it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pixpro import demo_data
from tests.support.cli import (
    REPO,
    SETUP_HINT,
    assert_one_line_error,
    cli,
    cluster_tiny_spec,
    job_log,
    status_json,
    wait_status,
    write_spec,
)
from tests.support.procs import wait_for
from tests.support.store import committed_pointer, local_pointer
from tests.support.trainer import assert_identical, final_state

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SHARED = Path("/tmp/pixpro-cli-slurm-tests")  # every node sees it: both nodes run on this machine
# The demo data is shared across sessions; a new generator version must not meet an old cached copy.
DATA_DIR = f"data-tiny48-v{demo_data.VERSION}"
MOTO_PORT = 5577
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "pixpro-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "pixpro-test-secret-9f3",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_jobs: list[str] = []


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    for tool in ("sinfo", "sbatch", "squeue", "sacct", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH: {SETUP_HINT}", pytrace=False)
    proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or "high" not in proc.stdout:
        pytest.fail(f"SLURM does not answer ({proc.stderr.strip()}): {SETUP_HINT}", pytrace=False)
    yield
    if _jobs:  # whatever state a failed test left them in
        subprocess.run(["scancel", *_jobs], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    path = SHARED / uuid.uuid4().hex[:8] / "home"
    path.mkdir(parents=True)
    yield path
    # Checkpoints are ~11 MB each here; records and logs stay for a post-mortem.
    for step_dir in path.glob("runs/*/checkpoints/step-*"):
        shutil.rmtree(step_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def spec_file(home: Path) -> Path:
    # One data root for all runs: the demo images are identical, and so is the spec hash.
    return write_spec(home.parent / "tiny.json", cluster_tiny_spec(SHARED / DATA_DIR))


def submit(
    home: Path, spec: Path, *args: str, env: dict[str, str] | None = None, preflight: bool = False
) -> tuple[str, str]:
    """``pixpro submit --json``; the preflight (seconds of CPU on the login node, and its own tests in
    test_cli and test_preflight) only where asked: these tests are about what SLURM does to a run."""
    flags = () if preflight else ("--no-preflight",)
    proc = cli("submit", "--json", *flags, *args, str(spec), home=home, cwd=spec.parent, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    _jobs.append(out["job_id"])
    return out["run_id"], out["job_id"]


def local_latest(ckpt: Path) -> Callable[[], dict[str, Any] | None]:
    """The pointer to the newest committed checkpoint, read as a person would (None before the first)."""
    return functools.partial(local_pointer, ckpt)


def run_dir(home: Path, run_id: str) -> Path:
    return home / "runs" / run_id


def finished(row: dict[str, Any]) -> bool:
    return row["state"] == "COMPLETED"


def no_failed(seen: list[str]) -> None:
    assert "FAILED" not in seen and "UNKNOWN" not in seen, seen


def reference(home: Path, spec_file: Path, nodes: int, gpus: int, preflight: bool = False) -> dict[str, Any]:
    run_id, job = submit(home, spec_file, "--nodes", str(nodes), "--gpus", str(gpus), preflight=preflight)
    row = wait_status(home, job, finished, timeout=300)
    return {
        "run_id": run_id,
        "job": job,
        "row": row,
        "state": final_state(str(run_dir(home, run_id) / "checkpoints")),
    }


@pytest.fixture(scope="module")
def ref4(home: Path, spec_file: Path) -> dict[str, Any]:
    """The uninterrupted 2 nodes x 2 GPUs run (world size 4), submitted as a user would: preflight first."""
    return reference(home, spec_file, 2, 2, preflight=True)


@pytest.fixture(scope="module")
def ref2(home: Path, spec_file: Path) -> dict[str, Any]:
    """The uninterrupted 2 nodes x 1 GPU run (world size 2, still two nodes and a rendezvous)."""
    return reference(home, spec_file, 2, 1)


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.timeout(420)
def test_two_nodes_four_ranks_complete(home: Path, ref4: dict[str, Any]) -> None:
    row, job, run_id = ref4["row"], ref4["job"], ref4["run_id"]
    assert row["state"] == "COMPLETED" and row["attempts"][0]["state"] == "COMPLETED", row
    assert row["step"] == row["total_steps"] == row["checkpoint_step"] == 20, row
    assert (row["nodes"], row["gpus_per_node"], row["job_id"]) == (2, 2, job)
    assert row["lr"] is not None and row["ema_momentum"] > 0.99 and row["img_per_s"] > 0
    assert row["eta_s"] is None and row["requeues"] == 0 and row["expected_start"] is None  # it ended

    rdir = run_dir(home, run_id)
    ckpt = rdir / "checkpoints"
    latest = json.loads((ckpt / "latest").read_bytes())
    manifest = json.loads((ckpt / latest["prefix"] / "manifest.json").read_bytes())
    assert manifest["meta"]["world_size"] == 4
    assert {f["name"] for f in manifest["files"]} >= {
        "train.pt",
        "rank0.pt",
        "rank1.pt",
        "rank2.pt",
        "rank3.pt",
    }

    # Files of a run: record twice, resolved spec, sbatch script, per-node logs, per-rank torchrun logs.
    record = json.loads((rdir / "run.json").read_bytes())
    assert json.loads((ckpt / "run.json").read_bytes()) == record
    assert record["attempts"] == [job] and record["executor"] == "slurm" and record["run_id"] == run_id
    spec = json.loads((rdir / "spec.json").read_bytes())
    assert spec["checkpoint"]["url"] == str(ckpt) and spec["resources"]["nodes"] == 2
    assert "#SBATCH --nodes=2" in (rdir / "sbatch.sh").read_text()
    assert (rdir / "submitit" / f"{job}_0_log.out").exists() and (
        rdir / "submitit" / f"{job}_1_log.out"
    ).exists()
    # torchrun's files by global rank, whichever node the rendezvous gave each rank
    assert {p.name for p in (rdir / "logs" / f"{job}.0").iterdir()} == {f"rank{r}" for r in range(4)}

    logs = cli("logs", job, "--rank", "0", home=home)  # rank 0 may be on either node: both files are read
    lines = [ln for ln in logs.stdout.splitlines() if ln.strip()]
    assert logs.returncode == 0 and all(ln.startswith("[rank0]:") for ln in lines), logs.stdout[-500:]
    assert any("completed at step 20 of 20" in ln for ln in lines), logs.stdout[-500:]
    assert "==> " in cli("logs", job, home=home).stdout  # both nodes' files, with headers
    assert "[rank3]:" not in cli("logs", job, "--rank", "2", home=home).stdout
    table = cli("status", home=home)
    assert table.returncode == 0 and run_id in table.stdout and "COMPLETED" in table.stdout


@pytest.mark.timeout(600)
def test_preemption_by_high_partition_requeues_same_job_and_ends_equal(
    home: Path, spec_file: Path, ref4: dict[str, Any]
) -> None:
    run_id, job = submit(home, spec_file, "--nodes", "2", "--gpus", "2")
    ckpt = run_dir(home, run_id) / "checkpoints"
    wait_for("a first committed checkpoint", lambda: (local_latest(ckpt)() or {}).get("step", 0) >= 2, 240)
    high = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "high",
            "-N",
            "2",
            "--exclusive",
            "-t",
            "2",
            "-o",
            str(home.parent / "high-%j.out"),
            "--wrap",
            "sleep 2",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    _jobs.append(high)
    seen: list[str] = []
    wait_status(home, job, lambda r: r["state"] in ("REQUEUED", "PREEMPTED"), 120, seen, interval=0.5)
    row = wait_status(home, job, finished, 400, seen)
    no_failed(seen)
    assert row["attempts"] == [row["attempts"][0]] and row["job_id"] == job, row  # same job id, requeued
    assert set(row["attempts"][0]["history"]) & {"PREEMPTED", "REQUEUED"}, row
    assert json.loads((ckpt / "latest").read_bytes())["attempt"] == f"{job}.1"
    high_state = subprocess.run(
        ["sacct", "-n", "-P", "-j", high, "-o", "State"], capture_output=True, text=True
    )
    assert "COMPLETED" in high_state.stdout, high_state.stdout
    assert_identical(ref4["state"], final_state(str(ckpt)), "preempted 2x2 run")
    # the partition kills a preempted job GraceTime + KillWait after its signal: the budgets took that
    log = (run_dir(home, run_id) / "submitit" / f"{job}_0_log.out").read_text()
    assert "a preemption is killed 25 s after its signal (GraceTime 20 s + KillWait 5 s)" in log, log[-3000:]


@pytest.mark.timeout(600)
def test_scontrol_requeue_then_usr2_resume_a_resumed_run_exactly(
    home: Path, spec_file: Path, ref2: dict[str, Any]
) -> None:
    run_id, job = submit(home, spec_file, "--nodes", "2", "--gpus", "1")
    latest = local_latest(run_dir(home, run_id) / "checkpoints")
    wait_for("a first committed checkpoint", lambda: (latest() or {}).get("step", 0) >= 2, 240)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    seen: list[str] = []
    wait_status(home, job, lambda r: r["state"] == "REQUEUED", 60, seen, interval=0.5)
    wait_for(
        "the requeued attempt's first commit", lambda: (latest() or {}).get("attempt") == f"{job}.1", 240
    )
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    row = wait_status(home, job, finished, 400, seen)
    no_failed(seen)
    assert "REQUEUED" in seen and row["attempts"][0]["job_id"] == job and len(row["attempts"]) == 1, (
        seen,
        row,
    )
    assert (latest() or {}).get("attempt") == f"{job}.2", latest()  # three segments: .0, .1, .2
    ckpt = str(run_dir(home, run_id) / "checkpoints")
    assert_identical(ref2["state"], final_state(ckpt), "requeued + USR2 run")


@pytest.mark.timeout(600)
def test_cancel_then_resume_by_job_id_continues_exactly(
    home: Path, spec_file: Path, ref2: dict[str, Any]
) -> None:
    """On one node with two ranks (the store on a port the kernel picks), against the two-node reference
    of the same world size: the layout changes nothing either."""
    run_id, first = submit(home, spec_file, "--nodes", "1", "--gpus", "2")
    rdir = run_dir(home, run_id)
    latest = local_latest(rdir / "checkpoints")
    wait_for("a first committed checkpoint", lambda: (latest() or {}).get("step", 0) >= 2, 240)
    proc = cli("cancel", run_id, home=home)
    assert proc.returncode == 0 and first in proc.stdout, proc.stderr
    wait_status(home, first, lambda r: r["state"] == "CANCELLED", 60)
    stopped_at = (latest() or {})["step"]

    proc = cli("resume", first, "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    second = json.loads(proc.stdout)["job_id"]
    _jobs.append(second)
    assert second != first
    line = assert_one_line_error(cli("resume", run_id, home=home), 1)  # an attempt is queued/running
    assert second in line

    row = wait_status(home, second, finished, 400)
    assert [a["state"] for a in row["attempts"]] == ["CANCELLED", "COMPLETED"], row
    assert f"resumed from step {stopped_at} " in job_log(rdir, second, lines=400)
    assert "--rdzv-endpoint 127.0.0.1:0 " in job_log(rdir, second, lines=10_000)
    record = json.loads((rdir / "run.json").read_bytes())
    assert record["attempts"] == [first, second] and record["cancelled"] == [first]
    assert json.loads((rdir / "checkpoints" / "run.json").read_bytes())["attempts"] == [first, second]
    assert_identical(ref2["state"], final_state(str(rdir / "checkpoints")), "cancelled + resumed run")


def trainers(job: str) -> dict[int, list[int]]:
    """Trainer pids of a job by SLURM node index (both "nodes" run on this machine)."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            raw = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(kv.split(b"=", 1) for kv in raw if b"=" in kv)
        if b"launch.train" in cmd and env.get(b"SLURM_JOB_ID") == job.encode():
            found.setdefault(int(env.get(b"SLURM_NODEID", b"0")), []).append(int(entry))
    return found


@pytest.mark.timeout(600)
def test_sigkill_of_a_rank_on_either_node_restarts_every_node_and_ends_exact(
    home: Path, ref2: dict[str, Any]
) -> None:
    """torchrun restarts after a rank's death on either node agree on the round (no hang, no stale
    address), also with a preemption signal arriving as the rank dies; the end equals an uninterrupted run."""
    import random

    rng = random.Random(os.getpid())
    tiny = cluster_tiny_spec(SHARED / DATA_DIR, resources__max_restarts=3)
    spec = write_spec(home.parent / "tiny-restarts.json", tiny)
    run_id, job = submit(home, spec, "--nodes", "2", "--gpus", "1")
    rdir = run_dir(home, run_id)
    latest = local_latest(rdir / "checkpoints")

    def step() -> int:
        return int((latest() or {}).get("step", 0))

    def both() -> dict[int, list[int]] | None:
        found = trainers(job)
        return found if len(found) == 2 else None

    # a rank on the second node; then one on the first as a preemption signal reaches the job
    for kills, (node, preempt) in enumerate(((1, False), (0, True)), start=1):
        at = min(step() + rng.randint(2, 4), 14)
        wait_for(f"a checkpoint at step {at}", lambda at=at: step() >= at, 240)
        victims = wait_for("a trainer on each node", both, 60)
        os.kill(victims[node][0], signal.SIGKILL)
        if preempt:
            subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
            break
        t0 = time.monotonic()
        wait_for(
            f"the restart after the kill on node {node}",
            lambda n=kills: job_log(rdir, job, lines=10**6).count("resumed from step") >= n,
            120,
        )
        print(f"kill {kills} (node {node}, step >= {at}): resumed {time.monotonic() - t0:.1f}s later")
    seen: list[str] = []
    row = wait_status(home, job, finished, 400, seen)
    no_failed(seen)
    log = job_log(rdir, job, lines=10**6)
    assert "Connection refused" not in log, log[-3000:]
    assert row["attempts"][0]["job_id"] == job and len(row["attempts"]) == 1, row
    assert_identical(ref2["state"], final_state(str(rdir / "checkpoints")), "run with killed ranks")


def _node_of(pid: int) -> str:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.split(b"=", 1) for kv in raw if b"=" in kv)[b"SLURMD_NODENAME"].decode()


def _job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return next(w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}="))


@pytest.mark.timeout(600)
def test_a_node_that_failed_a_run_twice_is_left_out_until_included(home: Path) -> None:
    """A rank SIGKILLed twice on one node (torchrun restarts it once, then the job fails): the run
    notes the node, status shows it, resume queues with --exclude and runs on the other node;
    --include-node gives the node back (to an attempt after a cancel: a completed run queues none)."""
    tiny = cluster_tiny_spec(SHARED / DATA_DIR, resources__max_restarts=1)
    spec = write_spec(home.parent / "tiny-node-failures.json", tiny)
    run_id, job = submit(home, spec)
    rdir = run_dir(home, run_id)
    killed: list[int] = []
    for n in range(2):
        pid = wait_for(
            f"trainer {n + 1}",
            lambda: next((p for p in trainers(job).get(0, []) if p not in killed), None),
            240,
        )
        wait_for(
            "a committed checkpoint", lambda: (local_latest(rdir / "checkpoints")() or {}).get("step"), 240
        )
        bad = _node_of(pid)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    row = wait_status(home, job, lambda r: r["state"] == "FAILED", 240)
    assert row["failed_nodes"] == {bad: 2} and row["excluded_nodes"] == [bad], row
    table = cli("status", home=home)
    assert f"leave out {bad} (2 failures)" in table.stderr + table.stdout, table.stderr

    proc = cli("resume", run_id, "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    second = json.loads(proc.stdout)["job_id"]
    _jobs.append(second)
    assert _job_field(second, "ExcNodeList") == bad
    wait_status(home, second, lambda r: r["state"] == "RUNNING", 240)
    assert _job_field(second, "NodeList") not in ("", "(null)", bad)
    assert cli("cancel", run_id, home=home).returncode == 0  # unfinished: a completed run resumes no more
    wait_status(home, second, lambda r: r["state"] == "CANCELLED", 240)

    proc = cli("resume", run_id, "--json", "--include-node", bad, home=home)
    assert proc.returncode == 0, proc.stderr
    third = json.loads(proc.stdout)["job_id"]
    _jobs.append(third)
    assert _job_field(third, "ExcNodeList") == "(null)"
    assert status_json(home, run_id)["excluded_nodes"] == []
    row = wait_status(home, third, finished, 300)
    assert row["step"] == row["total_steps"] == 20, row
    assert json.loads(cli("resume", run_id, "--json", home=home).stdout)["job_id"] is None


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    script = REPO / "cluster/s3/moto.sh"
    proc = subprocess.run(
        ["bash", str(script), "start", str(MOTO_PORT)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr
    yield f"http://127.0.0.1:{MOTO_PORT}"
    subprocess.run(["bash", str(script), "stop", str(MOTO_PORT)], capture_output=True, timeout=60)


@pytest.mark.timeout(720)
def test_s3_checkpoints_through_requeue_cancel_resume(home: Path, moto: str, ref2: dict[str, Any]) -> None:
    import s3fs

    bucket = f"pixpro-cli-{uuid.uuid4().hex[:8]}"
    options = {"client_kwargs": {"endpoint_url": moto}}
    fs = s3fs.S3FileSystem(
        key=S3_ENV["AWS_ACCESS_KEY_ID"],
        secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
        use_listings_cache=False,
        **options,
    )
    fs.mkdir(bucket)
    url = f"s3://{bucket}/runs/tiny"
    spec = write_spec(
        home.parent / "tiny-s3.json",
        cluster_tiny_spec(SHARED / DATA_DIR, checkpoint__url=url, checkpoint__storage_options=options),
    )

    def read(rel: str) -> bytes:
        return fs.cat_file(f"{bucket}/runs/tiny/{rel}")

    def latest() -> dict[str, Any] | None:
        try:
            return committed_pointer(read("latest"))
        except (FileNotFoundError, ValueError):
            return None

    run_id, first = submit(home, spec, "--nodes", "2", "--gpus", "1", env=S3_ENV)
    wait_for("a first commit on S3", lambda: (latest() or {}).get("step", 0) >= 2, 240, interval=0.5)
    subprocess.run(["scancel", "--signal=USR2", first], check=True, timeout=30)
    seen: list[str] = []
    wait_for(
        "the requeued attempt's commit on S3", lambda: (latest() or {}).get("attempt") == f"{first}.1", 240
    )
    assert cli("cancel", run_id, home=home, env=S3_ENV).returncode == 0
    wait_status(home, first, lambda r: r["state"] == "CANCELLED", 60, seen, env=S3_ENV)
    proc = cli("resume", run_id, "--json", home=home, env=S3_ENV)
    assert proc.returncode == 0, proc.stderr
    second = json.loads(proc.stdout)["job_id"]
    _jobs.append(second)
    row = wait_status(home, second, finished, 400, seen, env=S3_ENV)
    no_failed(seen)
    assert row["checkpoint_url"] == url and row["step"] == row["total_steps"] == 20, row
    assert row["checkpoint_age_s"] is not None and row["lr"] is not None, row

    remote_record = json.loads(read("run.json"))
    assert remote_record["attempts"] == [first, second] and remote_record["run_id"] == run_id
    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"]
    rdir = run_dir(home, run_id)
    for text in (
        read("run.json").decode(),
        (rdir / "run.json").read_text(),
        (rdir / "spec.json").read_text(),
        read("status.json").decode(),
    ):
        assert secret not in text and S3_ENV["AWS_ACCESS_KEY_ID"] not in text
    creds = {"key": S3_ENV["AWS_ACCESS_KEY_ID"], "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]}
    assert_identical(
        ref2["state"], final_state(url, {**options, **creds}), "S3 run (USR2 requeue, cancel, resume)"
    )
    assert status_json(home, run_id, env=S3_ENV)["state"] == "COMPLETED"
