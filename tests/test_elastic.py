"""launch.elastic's adjustments of torch's agent: the rendezvous's method-name lookup names the same frame
as torch's, and a rank's failure is one record while its peers are SIGKILLed at once."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
from pathlib import Path

from torch.distributed.elastic.rendezvous import dynamic_rendezvous

from cluster.nodes import failures
from launch.elastic import ROUND_PORT_BASE, caller_name, round_port
from schemas.contract import ATTEMPT_ENV, PREEMPT_ENV

REPO = Path(__file__).resolve().parents[1]


def torchs(depth: int = 2) -> str:
    """torch 2.14's ``dynamic_rendezvous.get_method_name``, as its source (checked below) has it."""
    if len(inspect.stack()) > depth:
        return inspect.stack()[depth].function
    return "no_method_name"


def _record(lookup):  # stands for DynamicRendezvousHandler._record: asks for its caller's name
    return lookup()


def keep_alive(lookup):
    return _record(lookup)


def test_caller_name_is_torchs_method_name_at_every_depth() -> None:
    source = Path(dynamic_rendezvous.__file__).read_text()
    assert "def get_method_name(depth=2):\n    if len(inspect.stack()) > depth:\n" in source
    assert "        return inspect.stack()[depth].function\n" in source
    assert keep_alive(caller_name) == keep_alive(torchs) == "keep_alive"
    for depth in range(1, 6):
        assert caller_name(depth) == torchs(depth), depth
    assert caller_name(10_000) == torchs(10_000) == "no_method_name"


DRIVER = """
import sys
from pathlib import Path
from launch import elastic
from launch.node_failures import RECORDER
from torch.distributed.run import main

elastic.install()
RECORDER.open(Path(sys.argv[1]), "t.0")
try:
    main(["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", "--rdzv-backend", "c10d", "--rdzv-id", "t",
          "--max-restarts", "0", *sys.argv[3:], sys.argv[2], sys.argv[1]])
except Exception as exc:  # the round failed (ChildFailedError), as it should
    print("driver:", type(exc).__name__, flush=True)
"""
WORKER = """
import os, signal, sys, time
from pathlib import Path
folder = Path(sys.argv[1])
if os.environ["RANK"] == "1":  # the one real failure, once rank 0 has its handler
    while not (folder / "ready").exists():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
signal.signal(signal.SIGTERM, lambda *_: (folder / "term").touch())  # as the trainer: only a flag
(folder / "ready").touch()
while True:  # a healthy rank waiting on its dead peer
    time.sleep(0.1)
"""


def _driver(folder: Path, *torchrun: str) -> list[str]:
    """The agent as launch.run installs it, running ``folder/worker.py`` with these torchrun options."""
    return [sys.executable, str(folder / "driver.py"), str(folder), str(folder / "worker.py"), *torchrun]


def test_one_rank_failure_is_one_record_and_its_peers_are_killed_at_once(tmp_path: Path) -> None:
    """torch's poll closed the surviving ranks with SIGTERM, which the trainer only notes, and SIGKILLed
    them 30 s later: recorded as the node's failures too (one per GPU; two leave a node out). Here the
    one rank that died is the one record, and its peer is SIGKILLed without a SIGTERM first."""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k != PREEMPT_ENV} | {"PYTHONPATH": str(REPO)}
    one_node = [
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        "--rdzv-conf",
        "is_host=1",
    ]
    proc = subprocess.run(_driver(tmp_path, *one_node), env=env, capture_output=True, text=True, timeout=240)
    assert "driver: ChildFailedError" in proc.stdout, proc.stdout + proc.stderr
    found = [(f.rank, f.cause) for f in failures(tmp_path)]
    assert found == [(1, "killed by SIGKILL")], proc.stderr
    assert not (tmp_path / "term").exists()


PORT_WORKER = """
import os, sys
from pathlib import Path
Path(sys.argv[1], f"rank{os.environ['RANK']}").write_text(os.environ["MASTER_PORT"])
"""


def test_a_multi_node_rounds_store_port_is_pixpros_not_the_kernels(tmp_path: Path) -> None:
    """Two agents (two nodes on this machine): round 0's store listens on the attempt's port below the
    rendezvous band, which no outgoing connection can hold, not on a port torch got from the kernel
    (ephemeral, and free only when it was asked)."""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "worker.py").write_text(PORT_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        rdzv = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != PREEMPT_ENV}
    env |= {"PYTHONPATH": str(REPO), ATTEMPT_ENV: "4242.1"}
    nodes = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{rdzv}"]
    agents = [
        subprocess.Popen(
            _driver(tmp_path, *nodes, "--rdzv-conf", f"is_host={1 - node}"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outs = [agent.communicate(timeout=240)[0] for agent in agents]
    expected = round_port("4242.1", 0)
    assert expected is not None and ROUND_PORT_BASE <= expected < 20000
    ports = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    assert ports == [str(expected)] * 2, outs


def test_round_ports_differ_by_round_and_restart_and_stay_in_their_band() -> None:
    assert round_port("local-3", 0) is None and round_port("77", 0) is None  # no job number, no restart
    ports = {round_port("123_4.2", r) for r in range(8)}
    assert len(ports) == 8 and all(p is not None and ROUND_PORT_BASE <= p < 20000 for p in ports)
    assert round_port("99.1", 0) == round_port("99.0", 1) != round_port("99.0", 0)
