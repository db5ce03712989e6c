"""A preemption signal in a process's first moments (before it has its handlers: seconds of imports for
the node's launcher and an exec'd rank) waits for the handlers instead of killing the process: whoever
starts one of ours holds the signals (launch.preempt.held), and the child takes them on installing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

from launch import forking
from launch.preempt import held
from tests.support.trainer import REPO

# What a child does: the signal arrives "during its imports", then it installs the trainer's flag.
CHILD = textwrap.dedent(
    """
    import os, signal, time
    from launch.preempt import PreemptionFlag
    os.kill(os.getpid(), signal.SIGUSR2)  # before any handler: the default action would kill us
    time.sleep(0.05)
    flag = PreemptionFlag((signal.SIGTERM, signal.SIGUSR2)).install()
    raise SystemExit(0 if flag.requested() and flag.received == signal.SIGUSR2 else 3)
    """
)


def _child() -> None:
    exec(CHILD, {})


def test_a_forked_child_takes_a_held_signal_once_it_has_its_handler() -> None:
    with held((signal.SIGTERM, signal.SIGUSR2)):
        proc = forking.fork_call(_child, ["child"])
    assert proc.wait(timeout=60) == 0


def test_an_execd_child_takes_a_held_signal_once_it_has_its_handler() -> None:
    with held((signal.SIGTERM, signal.SIGUSR2)):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
    assert proc.wait(timeout=60) == 0


def test_the_holder_takes_a_signal_that_came_meanwhile_on_leaving() -> None:
    got: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(signum))
    try:
        with held((signal.SIGUSR2,)):  # this thread's mask: the signal aimed at this thread waits
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
            assert got == []
        assert got == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)
