"""`cluster/slurm/setup.sh` + `stop.sh` leave the machine as they found it.

A second cluster is brought up beside the running test cluster: a fresh temporary PIXPRO_SLURM_DIR,
other ports, real accounting (mariadbd + slurmdbd, the most the script starts). One tiny job runs and
shows in sacct; then stop.sh. System places (/etc, /usr/local/bin, /run, /var/lib, /var/log, ...:
names, sizes, modes, mtimes, link targets) must be exactly as before, and no process it started may be
left. The Debian packages are installed beforehand (by the main cluster's setup), so nothing changes.
Needs root, like setup.sh; ~10 s.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "cluster/slurm/setup.sh"
STOP = REPO / "cluster/slurm/stop.sh"
MAIN_DIR = Path(os.environ.get("PIXPRO_SLURM_DIR") or "/var/lib/pixpro-slurm")
PORT_BASE = int(os.environ.get("PIXPRO_TEST_SLURM_SETUP_PORT_BASE", "8817"))
WATCHED = ["/etc", "/usr/local/bin", "/usr/local/sbin", "/usr/sbin", "/run", "/var/run", "/var/lib",
           "/var/log", "/var/spool", "/var/tmp", "/dev/shm"]  # fmt: skip
# Changed by others while the test runs: the running test cluster, apt/dpkg bookkeeping of other work,
# this test's own caches.
IGNORED = [str(MAIN_DIR), "/var/lib/apt", "/var/lib/dpkg", "/var/log/apt", "/root/.cache", "/root/.local"]
# Written into by other tests at any moment (a DataLoader's shared memory comes and goes in /dev/shm):
# what is in them is compared, their own mtime is not.
SHARED = {"/dev/shm"}
DAEMONS = {"munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "slurmstepd", "slurmscriptd"}


def snapshot(roots: list[str], ignored: list[str]) -> dict[str, tuple]:
    """path -> (kind, size, mode, mtime_ns, link target) of everything below the roots."""
    out: dict[str, tuple] = {}

    def skip(path: str) -> bool:
        return any(path == i or path.startswith(i.rstrip("/") + "/") for i in ignored)

    def add(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        kind = oct(st.st_mode >> 12)
        target = os.readlink(path) if os.path.islink(path) else ""
        out[path] = (kind, st.st_size if not os.path.isdir(path) else 0, st.st_mode, st.st_mtime_ns, target)

    for root in roots:
        if os.path.islink(root):
            add(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if skip(dirpath):
                dirnames[:] = []
                continue
            add(dirpath)
            dirnames[:] = [d for d in dirnames if not skip(os.path.join(dirpath, d))]
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                path = os.path.join(dirpath, name)
                if not skip(path):
                    add(path)
    return out


def processes() -> dict[int, tuple[str, str]]:
    """pid -> (comm, cmdline) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(entry.name)] = (comm, cmdline)
    return out


def diff(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    lines = [f"new: {p} {after[p]}" for p in sorted(set(after) - set(before))]
    lines += [f"gone: {p} {before[p]}" for p in sorted(set(before) - set(after))]
    lines += [f"changed: {p} {before[p]} -> {after[p]}" for p in sorted(set(before) & set(after))
              if before[p] != after[p] and p not in SHARED]  # fmt: skip
    return lines


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    # Below /tmp (not pytest's 0700 tmp_path): munged and mariadbd run as their own users.
    path = Path(tempfile.mkdtemp(prefix="pixpro-slurm-setup-", dir="/tmp"))
    yield path
    env = {**os.environ, "PIXPRO_SLURM_DIR": str(path)}
    subprocess.run(["bash", str(STOP), "--cancel-jobs"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(240)
def test_setup_and_stop_leave_the_machine_as_found(cluster_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root, like cluster/slurm/setup.sh", pytrace=False)
    if not shutil.which("slurmdbd", path="/usr/sbin:/usr/bin") or not shutil.which(
        "mariadbd", path="/usr/sbin"
    ):
        pytest.fail("slurmdbd/mariadb-server not installed: run cluster/slurm/setup.sh first", pytrace=False)
    path = [p for p in os.environ.get("PATH", "").split(":") if p and not p.startswith(str(MAIN_DIR))]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PIXPRO_SLURM_"))},
        "PIXPRO_SLURM_DIR": str(cluster_dir),
        "PIXPRO_SLURM_ACCOUNTING": "slurmdbd",
        "PIXPRO_SLURM_PORT_BASE": str(PORT_BASE),
        "PIXPRO_SLURM_CPUS": "1",
        "PIXPRO_SLURM_GPUS": "0",
        "PIXPRO_SLURM_MEM_MB": "500",
        "PATH": ":".join(path),
    }
    before = snapshot(WATCHED, IGNORED)
    procs_before = processes()

    t0 = time.monotonic()
    up = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=150)
    assert up.returncode == 0, up.stderr[-3000:]
    started_s = time.monotonic() - t0
    env["SLURM_CONF"] = str(cluster_dir / "etc/slurm.conf")
    sub = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=cluster_dir)  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    states = ""
    while time.monotonic() < deadline:
        states = subprocess.run(
            ["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job], env=env, capture_output=True,
            text=True, timeout=60,
        ).stdout  # fmt: skip
        if f"{job}|COMPLETED" in states:
            break
        time.sleep(0.3)
    assert f"{job}|COMPLETED" in states, states
    # The main cluster did not see this job: a separate controller on other ports.
    main = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%i|%T"], capture_output=True, text=True, timeout=60
    )
    assert f"{job}|" not in main.stdout or main.returncode != 0 or "COMPLETED" not in main.stdout

    down = subprocess.run(["bash", str(STOP), "--cancel-jobs"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert down.returncode == 0, down.stdout + down.stderr
    after = snapshot(WATCHED, IGNORED)
    changes = diff(before, after)
    assert not changes, f"setup.sh/stop.sh changed the machine (started in {started_s:.1f}s):\n" + "\n".join(
        changes[:40]
    )
    # Every process that is new since the start and belongs to this cluster is gone. A job step's
    # slurmstepd names only its job: one of the main cluster's (a requeued job of another test, still
    # starting or ending) is not this cluster's.
    left = {
        pid: cmd
        for pid, (comm, cmd) in processes().items()
        if pid not in procs_before
        and (comm in DAEMONS or str(cluster_dir) in cmd)
        and (comm != "slurmstepd" or f"[{job}." in cmd)
    }
    assert not left, f"left running: {left}"


def test_first_host_without_hosts_entries_is_the_node_address() -> None:
    """No /etc/hosts line for node1/node2: the rendezvous host is the first node's NodeAddr."""
    from cluster.torchrun import first_host

    if subprocess.run(
        ["scontrol", "show", "node", "-o", "node1"], capture_output=True, timeout=30
    ).returncode:
        pytest.fail("the test cluster does not answer: run cluster/slurm/setup.sh as root", pytrace=False)
    try:
        socket.getaddrinfo("node1", None)
        want = "node1"  # this machine resolves the name after all
    except OSError:
        want = "127.0.0.1"  # NodeAddr in slurm.conf; never "localhost"
    assert first_host("node[1-2]") == want
    assert first_host("localhost") == "localhost"  # a name that resolves is kept
