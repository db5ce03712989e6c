"""The rendezvous a multi-node job meets at (its port, which node hosts it), and the one per-node command
that ``--dry-run`` prints and every node task runs."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest

from cluster.node_task import JobContext, NodeTask, TrainerFailed
from cluster.runs import Submission, plan_submission
from cluster.torchrun import EPHEMERAL_START, PLACEHOLDERS, port_free, rdzv_port
from schemas.contract import HOME_ENV
from tests.support.cli import write_spec
from tests.support.trainer import tiny_spec


def test_rendezvous_ports_lie_below_the_ephemeral_range() -> None:
    """An outgoing connection (S3, gloo, a store client) takes its local port from the ephemeral range;
    a rendezvous port in there fails at random (CI: a 2-node resume whose store port an S3 request held)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low >= EPHEMERAL_START, f"this machine's ephemeral ports start at {low}"
    ports = {rdzv_port(str(job), restart) for job in range(0, 200_000, 7) for restart in range(8)}
    assert min(ports) > 1024 and max(ports) < EPHEMERAL_START, (min(ports), max(ports))
    assert len({rdzv_port("4711", r) for r in range(8)}) == 8  # a requeue never reuses the last port


def test_a_one_node_job_lets_the_store_pick_any_free_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Single-node jobs share nodes: a derived port could collide with a neighbour's, and no other node
    needs to find this one (the node list is not even looked up: a made-up name would fail that)."""
    env = {"SLURM_JOB_ID": "4711", "SLURM_RESTART_COUNT": "2", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "no-such-node-anywhere"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ctx = JobContext.from_slurm_env()
    assert (ctx.endpoint, ctx.nnodes, ctx.attempt) == ("127.0.0.1:0", 1, "4711.2")


def _task(tmp_path: Path) -> NodeTask:
    return NodeTask(
        run_id="r", run_dir=str(tmp_path), workdir=str(tmp_path),
        nodes=2, gpus_per_node=0, max_restarts=0, signal_name="USR2", signal_lead_s=60,
    )  # fmt: skip


def _ctx(node: int, port: int) -> JobContext:
    return JobContext(job_id="7", restart=0, node=node, nnodes=2, endpoint=f"127.0.0.1:{port}", slurm=True)


def test_node_zero_alone_hosts_the_store(tmp_path: Path) -> None:
    """Left to torchrun, both nodes of a one-machine allocation (and any node whose bind fails) would
    try to host, then fall back to waiting as clients."""
    task = _task(tmp_path)
    for node, flag in ((0, "is_host=1"), (1, "is_host=0")):
        cmd = task.command(_ctx(node, rdzv_port("7")))
        assert cmd[cmd.index("--rdzv-conf") + 1] == flag, cmd


@pytest.fixture
def held_port() -> tuple[socket.socket, int]:
    """A port held by an outgoing connection's socket, the way an S3 request holds an ephemeral one."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.bind(("127.0.0.1", 0))
    client.connect(server.getsockname())
    yield client, client.getsockname()[1]
    client.close()
    server.close()


def test_a_taken_port_fails_node_zero_in_one_line_before_anything_starts(
    tmp_path: Path, held_port: tuple[socket.socket, int]
) -> None:
    _, port = held_port
    assert not port_free(port)
    task = _task(tmp_path)
    with pytest.raises(TrainerFailed) as err:
        task.run(_ctx(0, port))
    assert f"rendezvous port {port} on 127.0.0.1 is in use" in str(err.value) and "\n" not in str(err.value)
    assert task._proc is None  # no launcher was started


def test_a_port_left_in_time_wait_counts_as_free() -> None:
    """TCPStore listens with SO_REUSEADDR: a closed connection of the previous attempt does not block it."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    port = server.getsockname()[1]
    conn.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
    client.close()
    server.close()
    assert port_free(port)


# ------------------------------------------------------------------ one command for --dry-run and nodes
SLURM_ENV = {"SLURM_JOB_ID": "4711", "SLURM_RESTART_COUNT": "2", "SLURM_JOB_NODELIST": "node[1-2]"}


def _plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, executor: str, nodes: int) -> Submission:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    spec = write_spec(tmp_path / "s.json", tiny_spec(tmp_path / "data", name="dry"))
    plan = plan_submission(spec, nodes=nodes, gpus=0, executor=executor, check_cluster=False, dry_run=True)
    assert not (tmp_path / "home").exists()  # a dry run writes nothing
    return plan


def _dry_run_line(plan: Submission, values: dict[str, str]) -> list[str]:
    """The dry run's per-node command as the shell would split and expand it with these values."""
    text = plan.dry_run_text().split("# torchrun command", 1)[1]
    (line,) = [ln for ln in text.splitlines() if "-m launch.run" in ln]
    words = shlex.split(line)
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):  # $SLURM_JOB_ID before $PORT...
        words = [w.replace(name, value) for w in words]
    assert not [w for w in words if any(p in w for p in PLACEHOLDERS)], words  # each has its node's value
    return words


def _runs(task: NodeTask, ctx: JobContext) -> list[str]:
    """What the node task starts: its environment's additions, then the argv."""
    env, argv = task.environment(ctx), task.command(ctx)
    added = task.launch(ctx).env
    assert all(env[k] == v for k, v in added.items())
    return [f"{k}={v}" for k, v in added.items()] + argv


@pytest.mark.parametrize("nodes", [1, 2])
def test_the_slurm_dry_run_prints_what_each_node_task_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodes: int
) -> None:
    plan = _plan(tmp_path, monkeypatch, "slurm", nodes)
    task = NodeTask.for_run(plan.record())
    monkeypatch.setattr("cluster.node_task.first_host", lambda nodelist: "node1")  # scontrol's answer
    for key, value in {**SLURM_ENV, "SLURM_JOB_NUM_NODES": str(nodes)}.items():
        monkeypatch.setenv(key, value)
    for node in range(nodes):
        monkeypatch.setenv("SLURM_NODEID", str(node))
        ctx = JobContext.from_slurm_env()
        values = {"$SLURM_JOB_ID": "4711", "$SLURM_RESTART_COUNT": "2", "$FIRST_HOST": "node1",
                  "$PORT": str(rdzv_port("4711", 2)), "$IS_HOST": "1" if node == 0 else "0"}  # fmt: skip
        assert _dry_run_line(plan, values) == _runs(task, ctx), node


def test_the_local_dry_run_prints_what_the_local_runner_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path, monkeypatch, "local", 1)
    task = NodeTask.for_run(plan.record())
    assert _dry_run_line(plan, {}) == [
        w.replace("local-7", "local-<n>") for w in _runs(task, JobContext.local("local-7"))
    ]
