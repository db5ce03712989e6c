"""Start a process by fork from one that has already imported torch and the trainer.

A rank imports torch, torchvision (whose ops import ``torch._dynamo``) and the trainer before it does
anything: about 5 CPU-seconds (``benches/bench_startup.py``), paid again by every rank, every uploader
and every restart after a failure. The node agent pays it once and forks its ranks from that state
(:func:`launch.elastic.install`); a rank forks its first uploader the same way. torch's DataLoader
starts its workers like this too: fork after import, before any CUDA.

Fork is taken only where it is safe. A child cannot use CUDA once the forking process initialized it,
or once torch "poisoned fork" there (any ``cudaGetDeviceCount``: ``torch.cuda.is_available()``, which
torchrun's ``LaunchConfig`` calls in the agent, unless ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, which
:mod:`launch.run` sets for it). :func:`enabled` asks a throw-away child whether it would be poisoned,
and where it would be and a GPU is visible the caller starts a fresh interpreter as before.

The child is made to look like a fresh one: its own session where asked (torchrun's
``start_new_session``), default signal handlers (the signals stay blocked until they are reset), no
inherited socket (the agent's rendezvous store must die with the agent), none of the parent's exit
handlers or finalizers, unbuffered stdio (``python -u``), the given environment and argv, and the
command line it would have had (``ps``, ``pgrep -f launch.train`` and py-spy see a rank as a rank).
``PIXPRO_FORK=0`` turns it off (every child a fresh interpreter).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import logging
import multiprocessing.util
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from typing import IO, Any

import setproctitle

from schemas.contract import FORK_ENV

_BLOCKED = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
_SET_HERE_ENV = "_PIXPRO_NVML_CHECK_SET_BY_AGENT"


def spare_device_checks() -> None:
    """Make torch's CUDA availability checks in this process NVML-based, which do not poison fork (where
    NVML answers: a GPU node), unless the user chose already; :func:`worker_env` keeps our choice from
    the workers, whose own checks should stay torch's default."""
    if NVML_CHECK_ENV not in os.environ:
        os.environ[NVML_CHECK_ENV] = os.environ[_SET_HERE_ENV] = "1"


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without what :func:`spare_device_checks` set."""
    if env.pop(_SET_HERE_ENV, None):
        env.pop(NVML_CHECK_ENV, None)
    return env


def enabled() -> bool:
    """Fork is allowed here: not turned off, and a child could use the GPUs it needs."""
    if os.environ.get(FORK_ENV, "1") == "0":
        return False
    torch = sys.modules.get("torch")
    if torch is None:
        return True
    if torch.cuda.is_initialized():
        return False
    # poisoned with no GPU visible (a CPU node, where the agent's check found none): nothing to lose
    return not (fork_poisoned() and torch.cuda.device_count() > 0)


def fork_poisoned() -> bool:
    """Whether a child forked now would be refused CUDA ("Cannot re-initialize CUDA in forked
    subprocess"): only a child can tell, so one is forked to answer."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    pid = os.fork()
    if pid == 0:
        os._exit(1 if torch.cuda._is_in_bad_fork() else 0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) != 0


class ForkedProcess:
    """The part of :class:`subprocess.Popen` that torchrun's worker handling and our own callers use."""

    def __init__(self, pid: int, args: Any = None) -> None:
        self.pid, self.args = pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_call(
    target: Callable[[], int | None],
    command: list[str],
    *,
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    stdout: IO | None = None,
    stderr: IO | None = None,
    new_session: bool = False,
    keep_fds: Iterable[int] = (),
) -> ForkedProcess:
    """Run ``target()`` in a forked child that exits with its return value (a fresh interpreter's rules
    for ``SystemExit`` and uncaught exceptions), titled ``command`` (the exec it stands for), with
    ``sys.argv`` = ``argv``. Call only where :func:`enabled` holds."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return ForkedProcess(pid, command)
    code = 1
    try:
        _fresh(old_mask, command, argv, env, stdout, stderr, new_session, set(keep_fds))
        code = _exit_code(target())
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(_finish(code))


def _fresh(
    old_mask: Iterable[int],
    command: list[str],
    argv: list[str] | None,
    env: dict[str, str] | None,
    stdout: IO | None,
    stderr: IO | None,
    new_session: bool,
    keep: set[int],
) -> None:
    """What a fresh interpreter would have: our own session, stdio, environment, handlers, exit hooks."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():  # the parent's Python handlers are not ours
        with contextlib.suppress(OSError, ValueError, TypeError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    noenv = os.environ.get("SPT_NOENV")
    os.environ["SPT_NOENV"] = "1"  # the title overwrites argv only: /proc/PID/environ stays readable
    setproctitle.setproctitle(" ".join(command))  # /proc/PID/cmdline
    setproctitle.setthreadtitle(os.path.basename(command[0])[:15])  # /proc/PID/comm, as an exec'd one
    if noenv is None:
        del os.environ["SPT_NOENV"]
    if new_session:
        os.setsid()
    if stdout is not None:
        os.dup2(stdout.fileno(), 1)
    if stderr is not None:
        os.dup2(stderr.fileno(), 2)
    gc.collect()  # the parent's garbage closes its own descriptors now, not one of ours later
    for fd in _open_fds():
        if fd > 2 and fd not in keep and _is_socket(fd):
            os.close(fd)
    atexit._clear()  # the parent's exit handlers and finalizers stay the parent's
    multiprocessing.util._finalizer_registry.clear()  # type: ignore[attr-defined]
    multiprocessing.util._run_after_forkers()  # type: ignore[attr-defined]
    weakref.finalize._registry.clear()  # type: ignore[attr-defined]
    weakref.finalize._registered_with_atexit = False  # type: ignore[attr-defined]
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if argv is not None:
        sys.argv = list(argv)
    for name, fd, errors in (("stdout", 1, "strict"), ("stderr", 2, "backslashreplace")):
        encoding = getattr(getattr(sys, name), "encoding", None) or "utf-8"  # python -u: on fds 1 and 2
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding, errors, write_through=True)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _finish(code: int) -> int:
    """A fresh interpreter's exit: wait for non-daemon threads, run exit handlers, flush."""
    with contextlib.suppress(BaseException):
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    if code < 0:  # died of a signal (SIGINT): the same for whoever waits on us
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code & 0xFF


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _open_fds() -> list[int]:
    with contextlib.suppress(OSError):
        return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    return []


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False
