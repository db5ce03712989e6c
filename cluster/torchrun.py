"""The per-node trainer command: ``python -m launch.run <torchrun options> -- spec --run-dir dir``.

Pure functions of the allocation: :func:`node_command` is the one builder, called by
:class:`~cluster.node_task.NodeTask` with a node's real values and by ``--dry-run`` with the SLURM
placeholders (:data:`PLACEHOLDERS`), so the dry run prints exactly what a node will run.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from schemas.contract import ATTEMPT_ENV, SIGNAL_ENV, RunPaths

PORT_BASE = 20000
EPHEMERAL_START = 32768
"""Linux's default ``ip_local_port_range`` starts here: any outgoing connection (an S3 request, a gloo
or NCCL socket) may hold a port above it, so a rendezvous port up there can be taken at random."""
PORT_SLOTS = (EPHEMERAL_START - PORT_BASE) // 8  # ports PORT_BASE .. PORT_BASE + 8 * PORT_SLOTS - 1
PLACEHOLDERS = ("$SLURM_", "$FIRST_HOST", "$PORT", "$IS_HOST")
"""What ``--dry-run`` prints for values each node of a SLURM job fills in."""
LOCAL_ENDPOINT = "127.0.0.1:0"
"""One node on this machine: the store takes a port the kernel picks when it listens (a port picked
earlier and handed over may be taken in between)."""
PREFIX_TEMPLATE = "[rank${rank}]: "
"""torchrun's prefix for tee'd lines; ``pixpro logs --rank R`` filters on it."""
LOGS_SPECS = "pixpro"
"""The ``torchrun.logs_specs`` entry point (launch.elastic.RankLogsSpecs): ``logs/<attempt>/rank<R>/``."""


def procs_per_node(gpus_per_node: int) -> int:
    return gpus_per_node if gpus_per_node > 0 else 1


def rdzv_port(job_id: str, restart: int = 0) -> int:
    """Derived from the job id (every node computes the same) and the restart count, so a requeued
    attempt never races a lingering socket of the previous one for the same port; below the
    ephemeral range, so no outgoing connection of the node holds it by chance."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return PORT_BASE + (int(digits) % PORT_SLOTS) * 8 + restart % 8


def port_free(port: int) -> bool:
    """Whether a server can listen on ``port`` (bound the way TCPStore binds: every address,
    SO_REUSEADDR, so a closed socket in TIME_WAIT does not count as in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def first_host(nodelist: str) -> str:
    """First host of the allocation, expanded by SLURM itself (never localhost: a wrong endpoint
    makes every node a world of one that waits forever). A node name that does not resolve (test
    clusters name their nodes node1, node2 on one machine) is replaced by the address SLURM itself
    uses for that node, its NodeAddr from ``scontrol show node``."""
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    if not out:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} printed nothing")
    try:
        socket.getaddrinfo(out[0], None)
        return out[0]
    except (socket.gaierror, UnicodeError):
        pass
    node = subprocess.run(
        ["scontrol", "show", "node", "-o", out[0]], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    addr = next((f.split("=", 1)[1] for f in node.split() if f.startswith("NodeAddr=")), "")
    if not addr or addr in ("(null)", "None"):
        raise RuntimeError(f"node {out[0]!r} does not resolve and scontrol shows no NodeAddr for it")
    return addr


def torchrun_options(
    *,
    nnodes: int,
    nproc_per_node: int,
    endpoint: str,
    rdzv_id: str,
    max_restarts: int,
    log_dir: Path | None = None,
    is_host: str | None = None,
) -> list[str]:
    """``is_host``: "1" on the node that hosts the rendezvous store, "0" on the others. Left to
    torchrun, every node whose address matches the endpoint tries to host and falls back to being a
    client when the port is taken, so a taken port leaves all nodes waiting for a host that never
    comes (and two nodes on one machine both match)."""
    opts = [
        "--nnodes", str(nnodes),
        "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", endpoint,
        "--rdzv-id", rdzv_id,
        "--max-restarts", str(max_restarts),
    ]  # fmt: skip
    if is_host is not None:
        opts += ["--rdzv-conf", f"is_host={is_host}"]
    if log_dir is not None:  # files per global rank (launch.elastic), console lines tagged with it too
        opts += ["--log-dir", str(log_dir), "--logs-specs", LOGS_SPECS, "--tee", "3",
                 "--log-line-prefix-template", PREFIX_TEMPLATE]  # fmt: skip
    return opts


def launch_command(
    options: list[str], spec_path: Path, run_dir: Path, python: str | None = None
) -> list[str]:
    return [python or sys.executable, "-u", "-m", "launch.run", *options, "--", str(spec_path),
            "--run-dir", str(run_dir)]  # fmt: skip


@dataclass(frozen=True)
class Placement:
    """Where one node task of an attempt runs, as its command needs it: a node's real values in
    :class:`~cluster.node_task.NodeTask`, the SLURM placeholders in ``--dry-run``."""

    rdzv_id: str
    endpoint: str
    is_host: str  # "1" on the node that hosts the rendezvous store
    attempt: str  # the attempt id the trainers name their checkpoints with


@dataclass(frozen=True)
class NodeCommand:
    """What a node task runs: the variables it adds to the node's environment, and the argv."""

    env: dict[str, str]
    argv: list[str]

    def shell(self) -> str:
        """One shell line (``VAR=value ... python -u -m launch.run ...``), placeholders expandable."""
        return " ".join([*(f"{k}={shell_quote(v)}" for k, v in self.env.items()), shell_join(self.argv)])


def node_command(
    run_dir: str | Path,
    placement: Placement,
    *,
    nodes: int,
    gpus_per_node: int,
    max_restarts: int,
    signal: str,
    python: str | None = None,
) -> NodeCommand:
    """The one builder of a node's launcher command (torchrun options, spec, run folder, environment)."""
    paths = RunPaths(run_dir)
    opts = torchrun_options(
        nnodes=nodes,
        nproc_per_node=procs_per_node(gpus_per_node),
        endpoint=placement.endpoint,
        rdzv_id=placement.rdzv_id,
        max_restarts=max_restarts,
        log_dir=paths.logs,
        is_host=placement.is_host,
    )
    env = {ATTEMPT_ENV: placement.attempt, SIGNAL_ENV: signal, "PYTHONUNBUFFERED": "1"}
    return NodeCommand(env, launch_command(opts, paths.spec, paths.run_dir, python=python))


def shell_quote(arg: str) -> str:
    """Shell-quoted, except that the placeholders (:data:`PLACEHOLDERS`) stay expandable."""
    if any(v in arg for v in PLACEHOLDERS) and not any(c in arg for c in "\"`'"):
        return f'"{arg}"'
    return shlex.quote(arg)


def shell_join(cmd: list[str]) -> str:
    return " ".join(shell_quote(c) for c in cmd)
