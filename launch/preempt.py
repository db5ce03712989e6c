"""Preemption signals: a flag set by the handler, acted on at a step boundary by every rank together.

Never save inside a signal handler (it deadlocks collectives); the handler only records the request.
SLURM's ``--signal`` reaches every process of the job step, so every process we start handles or
ignores the preemption signals: the trainer sets a flag, DataLoader workers ignore them. A process
that starts one of ours holds the signals (:func:`held`) until the child has its handlers; the child
then takes any that came meanwhile (:func:`release`), so a preemption in an attempt's first seconds
is not a failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from types import FrameType

from schemas.contract import Exit

log = logging.getLogger(__name__)

EXIT_PREEMPTED = Exit.PREEMPTED


IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
"""What a helper of the trainer (a DataLoader worker, an uploader) ignores: the trainer handles
preemption and tells its helpers when to stop."""


class PreemptionFlag:
    """Records that a preemption signal arrived, and when; :meth:`requested` is read at step boundaries.

    Plain attributes, no lock: the handler runs in the main thread between two bytecodes, possibly
    while the main thread is inside :meth:`trigger` (a ``threading.Event`` there would deadlock on its
    own lock)."""

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self.since: float | None = None
        """``time.monotonic()`` of the first request: a final save's budget runs from here."""

    def install(self) -> PreemptionFlag:
        """Handle the signals, then take those held since this process started (:func:`held`)."""
        for sig in self.signals:
            signal.signal(sig, self._handle)
        release(self.signals)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum)
        self.since = self.since or time.monotonic()

    def trigger(self) -> None:
        """Request a stop as a signal would (used for scripted stops at a given step)."""
        self.received = self.received or signal.SIGUSR2
        self.since = self.since or time.monotonic()

    def requested(self) -> bool:
        return self.since is not None


@contextlib.contextmanager
def held(signals: Iterable[int]) -> Iterator[None]:
    """Block ``signals`` in this thread while a child process starts: the mask is inherited across
    fork and exec, so a preemption signal that reaches the child before it has its handlers (a few
    seconds of imports) waits for them instead of killing it (a user signal's default action), and
    the child takes it with :func:`release`. Here, one that came meanwhile is taken on leaving."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def release(signals: Iterable[int]) -> None:
    """Unblock ``signals`` once their handlers are in: one that arrived while held is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signals))


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn`` (and the uploader's start): helpers must outlive a job-step-wide
    signal, not die from it."""
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Have Linux send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG), so a helper of a
    killed process does not live on as an orphan; exit now if the parent is already gone."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # died before the prctl took effect
        os._exit(0)


def children_of(pid: int) -> list[int]:
    """Direct child pids of ``pid`` from /proc (Linux): the agent forwards signals to its workers."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return found


def forward_to_children(signals: Iterable[signal.Signals], mark_env: str | None = None) -> None:
    """Install handlers that pass each preemption signal on to this process's children.

    Used in the torchrun agent: it must not die from the user signal, and a SIGTERM aimed at the agent
    alone (not the whole job step) must still reach the trainers so they checkpoint before exiting.
    ``mark_env`` is set in this process's environment, which children started later inherit.
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        if mark_env:
            os.environ[mark_env] = signal.Signals(signum).name
        for child in children_of(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signals = tuple(signals)
    for sig in signals:
        signal.signal(sig, handle)
    release(signals)
