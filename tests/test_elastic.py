"""launch.elastic's adjustments of torch's agent: the rendezvous's method-name lookup names the same frame
as torch's, and a rank's failure is one record while its peers are SIGKILLed at once."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

from torch.distributed.elastic.rendezvous import dynamic_rendezvous

from cluster.nodes import failures
from launch.elastic import caller_name
from schemas.contract import PREEMPT_ENV

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
    main(["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", "--nnodes", "1", "--nproc-per-node", "2",
          "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", "t", "--max-restarts", "0",
          "--rdzv-conf", "is_host=1", sys.argv[2], sys.argv[1]])
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


def test_one_rank_failure_is_one_record_and_its_peers_are_killed_at_once(tmp_path: Path) -> None:
    """torch's poll closed the surviving ranks with SIGTERM, which the trainer only notes, and SIGKILLed
    them 30 s later: recorded as the node's failures too (one per GPU; two leave a node out). Here the
    one rank that died is the one record, and its peer is SIGKILLed without a SIGTERM first."""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k != PREEMPT_ENV} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path), str(tmp_path / "worker.py")],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert "driver: ChildFailedError" in proc.stdout, proc.stdout + proc.stderr
    found = [(f.rank, f.cause) for f in failures(tmp_path)]
    assert found == [(1, "killed by SIGKILL")], proc.stderr
    assert not (tmp_path / "term").exists()
