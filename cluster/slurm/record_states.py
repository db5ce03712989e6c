"""Record what ``squeue`` and ``sacct -D`` really print for each job state, on the running cluster.

    . /var/lib/pixpro-slurm/env.sh && python cluster/slurm/record_states.py > /tmp/slurmdbd.txt

Submits short jobs and drives them through every state ``pixpro status`` shows: never ran (PENDING,
BeginTime), running first attempt, ``scontrol requeue`` twice (REQUEUED, restart 1, restart 2), partition
preemption (PREEMPTED, requeued), cancelled, TIMEOUT (--time=1: about 90 s), a node taken down while a
requeueable and a non-requeueable job run on it (NODE_FAIL). After each step it prints the exact output
of the two commands ``cluster.slurm.query`` runs, under ``## <label> <job ids by role>`` headers; the
unit tests in tests/test_slurm_accounting.py parse such recordings. Takes about 2 minutes; uses node1
and node2 exclusively-ish (run it on an otherwise idle cluster).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.slurm import SACCT_ARGS, SQUEUE_ARGS


def sh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def sbatch(*args: str) -> str:
    return sh("sbatch", "--parsable", "-o", "/dev/null", *args).strip().split(";")[0]


def qstate(job: str) -> str:
    return sh("squeue", "-h", "-j", job, "-o", "%T", check=False).strip()


def wait(what: str, pred, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.3)


def restarts(job: str) -> int:
    out = sh("scontrol", "show", "job", "-o", job, check=False)
    for item in out.split():
        if item.startswith("Restarts="):
            return int(item.split("=", 1)[1])
    return -1


def main() -> None:
    roles = {
        "never_ran": sbatch("--begin=now+3600", "-t", "5", "--wrap", "true"),
        "running": sbatch("-w", "node1", "-t", "10", "--requeue", "--wrap", "sleep 600"),
        "requeued": sbatch("-w", "node1", "-t", "10", "--requeue", "--wrap", "sleep 600"),
        "cancelled": sbatch("-w", "node2", "-t", "10", "--wrap", "sleep 600"),
        "timeout": sbatch("-w", "node1", "-t", "1", "--wrap", "sleep 600"),
        "preempted": sbatch("-p", "cpu", "-w", "node2", "-t", "10", "--requeue", "--wrap", "sleep 600"),
        "node_fail_requeue": sbatch("-w", "node1", "-t", "10", "--requeue", "--wrap", "sleep 600"),
    }
    ids = ",".join(roles.values())

    def snap(label: str) -> None:
        print(f"## {label} {json.dumps(roles)}")
        print("### squeue")
        print(sh("squeue", *SQUEUE_ARGS, ids, check=False), end="")
        print("### sacct")
        print(sh("sacct", *SACCT_ARGS, ids, check=False), end="", flush=True)

    running = [r for r in roles if r != "never_ran"]
    wait("jobs running", lambda: all(qstate(roles[r]) == "RUNNING" for r in running))
    time.sleep(1)
    snap("started")

    sh("scancel", roles["cancelled"])
    sh("scontrol", "requeue", roles["requeued"])
    sbatch("-p", "high", "-w", "node2", "--exclusive", "-t", "2", "--wrap", "sleep 5")
    wait("requeued pending", lambda: qstate(roles["requeued"]) == "PENDING")
    time.sleep(1)
    snap("requeued_once_pending")
    wait(
        "requeued running again",
        lambda: qstate(roles["requeued"]) == "RUNNING" and restarts(roles["requeued"]) == 1,
    )
    time.sleep(1)
    snap("requeued_once_running")
    sh("scontrol", "requeue", roles["requeued"])
    wait("requeued pending again", lambda: qstate(roles["requeued"]) == "PENDING")
    time.sleep(1)
    snap("requeued_twice_pending")
    preempted = roles["preempted"]
    wait("preempted pending", lambda: restarts(preempted) >= 1 and qstate(preempted) == "PENDING")
    time.sleep(1)
    snap("preempted_pending")
    wait("requeued running a third time", lambda: qstate(roles["requeued"]) == "RUNNING")
    wait("preempted running again", lambda: qstate(roles["preempted"]) == "RUNNING")
    time.sleep(1)
    snap("requeued_twice_running")
    wait("timeout", lambda: qstate(roles["timeout"]) in ("", "TIMEOUT"), timeout=180)
    time.sleep(2)
    snap("timed_out")
    roles["node_fail"] = sbatch("-w", "node1", "-t", "10", "--no-requeue", "--wrap", "sleep 600")
    ids = ",".join(roles.values())
    wait("node_fail running", lambda: qstate(roles["node_fail"]) == "RUNNING")

    sh("scontrol", "update", "NodeName=node1", "State=DOWN", "Reason=pixpro-record")
    wait(
        "node fail",
        lambda: qstate(roles["node_fail_requeue"]) == "PENDING" and qstate(roles["node_fail"]) != "RUNNING",
    )
    time.sleep(2)
    snap("node_failed")
    sh("scontrol", "update", "NodeName=node1", "State=RESUME", check=False)  # may be back already
    wait("node_fail_requeue running again", lambda: qstate(roles["node_fail_requeue"]) == "RUNNING")
    time.sleep(1)
    snap("node_failed_running_again")

    sh("scancel", *roles.values(), check=False)
    wait(
        "all ended",
        lambda: all(
            qstate(j) in ("", "CANCELLED", "COMPLETED", "TIMEOUT", "NODE_FAIL") for j in roles.values()
        ),
    )
    time.sleep(2)
    snap("all_cancelled")


if __name__ == "__main__":
    main()
