"""Which failures are blamed on a node, and how a run leaves out a node that failed it twice: the
records, the count, ``--include-node``, ``sbatch --exclude``, the partition check and ``pixpro status``.
The agent-side recording runs for real in tests/test_preemption.py and tests/test_hang.py, the whole
loop on the SLURM test cluster in tests/test_cli_slurm.py."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster import nodes
from cluster.errors import UsageError
from cluster.record import RunRecord
from cluster.slurm import check_partitions, executor_parameters, parse_sinfo, render_script
from cluster.status import checkpoint_warnings, collect
from launch.node_failures import NodeFailures, cause_of
from schemas import RunSpec
from tests.support.cli import assert_one_line_error, cli
from tests.support.runs import fake_runs

CUDA_TAIL = (
    "step 41\nTraceback (most recent call last):\n  ...\n"
    "RuntimeError: CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported\n"
)


NCCL_TIMEOUT = (
    "[rank3]:[E1207 10:12:01.004] [PG ID 0 PG GUID 0(default_pg) Rank 3] Watchdog caught collective "
    "operation timeout: WorkNCCL(SeqNum=812, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=910000) "
    "ran for 910004 milliseconds before timing out.\n"
    "[rank3]:[E1207 10:12:01.009] [PG ID 0 PG GUID 0(default_pg) Rank 3] To avoid data inconsistency, we "
    "are taking the entire process down.\n"
)
NCCL_REMOTE = (
    "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:2021, remote process exited or "
    "there was a network error, NCCL version 2.27.5\nncclRemoteError: A call failed possibly due to a "
    "network error or a remote process exiting prematurely.\n"
)


@pytest.mark.parametrize(
    ("exitcode", "log", "cause"),
    [
        (-signal.SIGKILL, "", "killed by SIGKILL"),
        (-signal.SIGSEGV, "", "killed by SIGSEGV"),
        (-signal.SIGABRT, "", "killed by SIGABRT"),
        # NCCL's watchdog aborts the ranks that waited on a collective (torch's own words): not this node
        (-signal.SIGABRT, NCCL_TIMEOUT, None),
        (-signal.SIGABRT, NCCL_REMOTE, None),
        # a GPU fault NCCL's watchdog saw first, then aborted on: the node's
        (-signal.SIGABRT, CUDA_TAIL + NCCL_TIMEOUT, "killed by SIGABRT after CUDA error: an illegal memory"),
        (-signal.SIGTERM, "", None),  # preemption, scancel
        (-signal.SIGUSR2, "", None),  # the run's preemption signal before its handler was set
        (1, CUDA_TAIL, "exited with status 1 after CUDA error: an illegal memory access was encountered"),
        (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", None),
        (1, "RuntimeError: CUDA error: out of memory\n", None),  # the run asks too much, not the node
        (1, "ValueError: bad spec\n", None),  # the run's own error
        (1, "RuntimeError: [gloo] Connection closed by peer\n", None),  # the echo of another node
        (1, "NCCL error: unhandled cuda error (run with NCCL_DEBUG=INFO for details)\n", "exited with"),
    ],
)
def test_what_is_blamed_on_the_node(tmp_path: Path, exitcode: int, log: str, cause: str | None) -> None:
    stderr = tmp_path / "stderr.log"
    stderr.write_text("x" * 100_000 + log)  # the cause is at the end of a long log
    found = cause_of(exitcode, str(stderr))
    if cause is None:
        assert found is None, found
    else:
        assert found is not None and found.startswith(cause), found


def test_the_agent_records_each_blamed_rank_once_and_not_the_watchdogs_kills(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-17")
    recorder = NodeFailures()
    recorder.open(tmp_path, "123.0")
    recorder.ignore(202)  # killed by the watchdog for the restart
    failures = {
        0: SimpleNamespace(pid=201, local_rank=0, exitcode=-signal.SIGKILL),
        1: SimpleNamespace(pid=202, local_rank=1, exitcode=-signal.SIGKILL),
        2: SimpleNamespace(pid=203, local_rank=2, exitcode=1),  # no CUDA error in its log
    }
    recorder.failed(failures, {0: "", 1: "", 2: str(tmp_path / "missing.log")})
    found = nodes.failures(tmp_path)
    assert [(f.node, f.rank, f.attempt, f.cause) for f in found] == [
        ("gpu-17", 0, "123.0", "killed by SIGKILL")
    ]


def _run_with_failures(tmp_path: Path, *blamed: str) -> RunRecord:
    (record,) = fake_runs(tmp_path / "home", 1)
    for i, node in enumerate(blamed):
        recorder = NodeFailures(node)
        recorder.open(Path(record.run_dir), "99.0")
        recorder.record(i, "killed by SIGKILL")
    return record


def test_two_failures_leave_a_node_out_until_it_is_included_again(tmp_path: Path) -> None:
    record = _run_with_failures(tmp_path, "node1", "node2", "node1")
    assert nodes.counts(record) == {"node1": 2, "node2": 1}
    assert nodes.excluded(record) == ["node1"]
    with pytest.raises(UsageError, match=r"--include-node node9: no failure of this run on that node"):
        nodes.include(record, ["node9"])
    nodes.include(record, ["node1"])
    assert nodes.excluded(record) == [] and nodes.counts(record) == {"node2": 1}


def _spec(**resources: object) -> RunSpec:
    return RunSpec.model_validate({"name": "x", "data": {"root": "/data"}, "resources": resources})


def test_left_out_nodes_reach_sbatch_beside_the_specs_own_exclude() -> None:
    params = executor_parameters(_spec(extra_sbatch={"exclude": "node7"}), exclude=["node1", "node7"])
    script = render_script(params, Path("/tmp/submitit"))
    assert "#SBATCH --exclude=node7,node1" in script, script
    plain = render_script(executor_parameters(_spec()), Path("/tmp/submitit"))
    assert "--exclude" not in plain


def test_a_partition_without_enough_nodes_once_the_failed_ones_are_left_out() -> None:
    parts = parse_sinfo("node1|cpu*|(null)|up\nnode2|cpu*|(null)|up\n")
    check_partitions(_spec(nodes=1), parts, exclude=["node1"])
    with pytest.raises(UsageError) as err:
        check_partitions(_spec(nodes=2), parts, exclude=["node1"])
    assert str(err.value) == (
        "--nodes 2: partition 'cpu' has only 1 node(s) without node1, left out after failing this run "
        "(pixpro resume --include-node NODE)"
    )


def test_status_lists_failed_and_left_out_nodes(tmp_path: Path) -> None:
    record = _run_with_failures(tmp_path, "node2", "node2", "node1")
    (row,), _ = collect([record])
    assert row["failed_nodes"] == {"node1": 1, "node2": 2} and row["excluded_nodes"] == ["node2"]
    (line,) = [w for w in checkpoint_warnings(row) if "leave out" in w]
    assert "node2 (2 failures)" in line and f"pixpro resume {row['run_id']} --include-node NODE" in line


def test_resume_include_node_refuses_a_node_that_never_failed(tmp_path: Path) -> None:
    record = _run_with_failures(tmp_path, "node1")
    before = (Path(record.run_dir) / "run.json").read_bytes()
    proc = cli("resume", record.run_id, "--include-node", "node5", home=tmp_path / "home")
    line = assert_one_line_error(proc, 2)
    assert "--include-node node5: no failure of this run on that node (failed nodes: node1)" in line
    assert (Path(record.run_dir) / "run.json").read_bytes() == before
