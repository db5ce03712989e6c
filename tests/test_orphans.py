"""A forced stop of the launcher (SIGKILL: the local runner's third signal, the OOM killer) ends its
ranks too. Each rank runs in a session of its own (as under torchrun), so a signal to the launcher's
process group never reaches them: without a parent-death signal they trained on as orphans and kept
committing checkpoints after the job had ended."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from launch.preempt import children_of
from schemas.contract import FORK_ENV, STEP_PAUSE_ENV
from tests.support.procs import wait_for
from tests.support.trainer import Tail, start_ranks, tiny_spec, write_spec

pytestmark = [pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("fork", ["1", "0"], ids=["forked", "execd"])
def test_ranks_and_their_uploaders_die_with_a_killed_launcher(
    tmp_path: Path, data_root: Path, fork: str
) -> None:
    spec = write_spec(tmp_path / "spec.json", tiny_spec(data_root, optim__max_steps=200, optim__epochs=40))
    proc = start_ranks(spec, tmp_path / "run", **{STEP_PAUSE_ENV: "0.5", FORK_ENV: fork})
    with Tail(proc) as out:
        wait_for("a first step", lambda: out.has("step 2/") or proc.poll() is not None, 180, 0.1)
        ranks = children_of(proc.pid)
        helpers = [pid for rank in ranks for pid in children_of(rank)]
        assert len(ranks) == 2 and len(helpers) >= 2, out.text()[-3000:]  # each rank's uploader at least
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = lambda: [pid for pid in ranks + helpers if _alive(pid)]  # noqa: E731
        try:
            wait_for("the ranks and their helpers to end", lambda: not left(), 60, 0.1)
        finally:
            for pid in left():
                os.kill(pid, signal.SIGKILL)
