"""The tests' ``python -m launch.*`` processes, forked from a parent that imported them once.

A trainer, agent or tool process spends about 4 CPU-seconds importing torch, torchvision and the
trainer before it does anything, and the tests start a few hundred of them: on a 2-core CI machine that
is most of the suite's CPU. Each test process (pytest-xdist worker) starts one *zygote*: a
single-threaded interpreter that imports the trainer and torchrun once, never runs a tensor op, and
forks a child per request with :func:`launch.forking.fork_call`, the start the node agent gives its
ranks in production (the child looks like a fresh interpreter: session, signals, sockets, exit hooks,
stdio, environment, argv, command line). The child runs the module's ``main()`` as ``python -m`` would.

:func:`popen` and :func:`run` take what :mod:`subprocess` takes for the calls the tests make. A command
that is not ``python [-u] -m launch.<module>``, or whose environment asks for fresh interpreters
(``PIXPRO_FORK=0``: the forked-against-fresh test), is exec'd by :mod:`subprocess` as before. The parent
learns a child's exit status from the zygote (the child is the zygote's, not ours). :func:`uploader`
forks a checkpoint uploader for a Checkpointer the test builds in its own (threaded) process, passing
the uploader's socket along. ``PIXPRO_TEST_ZYGOTE=0`` turns it off.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

from launch.forking import ForkedProcess, fork_call
from launch.uploader import Started
from launch.uploader import fresh_env as fresh_uploader_env
from launch.uploader import start as start_uploader
from schemas.contract import FORK_ENV

REPO = Path(__file__).resolve().parents[2]
OFF_ENV = "PIXPRO_TEST_ZYGOTE"
"""``PIXPRO_TEST_ZYGOTE=0`` in the tests' environment execs every process (the suite as before)."""
PRELOAD = ("launch.train", "launch.run", "torch.distributed.run")
_MAX_MSG = 1 << 20
_TITLE_ROOM = 8192


# ------------------------------------------------------------------------------------ the zygote
def _serve(sock: socket.socket) -> None:
    """Fork a child for each request until the test process closes its end."""
    for name in PRELOAD:
        importlib.import_module(name)
    from pixpro import photometric_cpu

    photometric_cpu.precompile()  # numba's machine code, as the node agent loads it for its ranks
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    sock.send(b'{"ready": true}')
    while True:
        for key, _ in sel.select():
            if key.fileobj is sock:
                msg, fds, _, _ = socket.recv_fds(sock, _MAX_MSG, 4)
                if not msg:
                    return  # the test process ended
                try:
                    reply: dict[str, Any] = {"pid": _start(json.loads(msg), fds, (wake_r, wake_w))}
                except Exception as exc:  # the request was bad: the caller raises it
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    for fd in fds:
                        os.close(fd)
                sock.send(json.dumps(reply).encode())
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
        _reap(sock)


def _start(req: dict[str, Any], fds: list[int], wake: tuple[int, int]) -> int:
    module = importlib.import_module(req["module"])  # once here: later children find it imported
    out, err, *kept = (_Fd(fd) for fd in fds)

    # a descriptor the child keeps (the uploader's socket): its number here replaces "{fd}" in the args
    def placed(words: list[str]) -> list[str]:
        return [str(kept[0].fd) if word == "{fd}" and kept else word for word in words]

    args, command = placed(req["args"]), placed(req["command"])

    def target() -> int | None:
        for fd in wake:
            os.close(fd)
        os.chdir(req["cwd"])
        return module.main()

    child = fork_call(
        target,
        command,
        argv=[module.__file__, *args],
        env=req["env"],
        stdout=out,
        stderr=err,
        new_session=req["new_session"],
        keep_fds=[k.fd for k in kept],
    )
    return child.pid


class _Fd:
    """A descriptor where :func:`launch.forking.fork_call` takes a stream: it only asks for the number."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


# ------------------------------------------------------------------------------------ the client
class _Zygote:
    """This process's zygote: requests go one at a time; a thread collects the children's exits."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            # a child's title (its command line) overwrites the zygote's argv, and is cut to its length
            [sys.executable, "-m", "tests.support.zygote", str(theirs.fileno()), " " * _TITLE_ROOM],
            cwd=REPO,
            env=_zygote_env(),
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock, self.lock = ours, threading.Lock()
        self.replies: list[dict[str, Any]] = []
        self.exits: dict[int, int] = {}
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True, name="zygote-exits").start()
        self._next_reply(timeout=300)  # the imports are done

    def _read(self) -> None:
        while True:
            try:
                msg = self.sock.recv(_MAX_MSG)
            except OSError:
                msg = b""
            with self.cond:
                if not msg:
                    self.replies.append({"error": "the zygote ended"})
                    self.cond.notify_all()
                    return
                data = json.loads(msg)
                if "exit" in data:
                    self.exits[data["exit"]] = data["code"]
                else:
                    self.replies.append(data)
                self.cond.notify_all()

    def _next_reply(self, timeout: float) -> dict[str, Any]:
        with self.cond:
            if not self.cond.wait_for(lambda: self.replies, timeout):
                raise RuntimeError("the zygote did not answer")
            reply = self.replies.pop(0)
        if "error" in reply:
            raise RuntimeError(f"zygote: {reply['error']}")
        return reply

    def start(self, req: dict[str, Any], fds: list[int]) -> int:
        with self.lock:
            socket.send_fds(self.sock, [json.dumps(req).encode()], fds)
            return int(self._next_reply(timeout=120)["pid"])

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        with self.cond:
            self.cond.wait_for(lambda: pid in self.exits or self.proc.poll() is not None, timeout)
            return self.exits.get(pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes our reader; the zygote reads its end of file
            self.sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


def _the_zygote() -> _Zygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = _Zygote()
            atexit.register(_zygote.close)
        return _zygote


class Child(ForkedProcess):
    """The part of :class:`subprocess.Popen` the tests use, for a child of the zygote: its exit status
    comes from the zygote, which waits for it."""

    def __init__(
        self, zygote: _Zygote, pid: int, args: Sequence[str], stdout: IO | None, stderr: IO | None
    ) -> None:
        super().__init__(pid, list(args))
        self.zygote, self.stdout, self.stderr = zygote, stdout, stderr

    def poll(self) -> int | None:
        return self._wait(0)

    def _wait(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.pid, timeout)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._wait(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        results: dict[str, Any] = {}
        readers = [
            threading.Thread(target=lambda n=n, s=s: results.__setitem__(n, s.read()), daemon=True)
            for n, s in (("out", self.stdout), ("err", self.stderr))
            if s is not None
        ]
        for t in readers:
            t.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in readers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for s in (self.stdout, self.stderr):
            if s is not None:
                s.close()
        return results.get("out"), results.get("err")


def _module_of(cmd: Sequence[str]) -> tuple[str, list[str]] | None:
    """``(module, args)`` of ``python [-u] -m launch.<module> ARGS``, else None."""
    args = list(cmd)
    if not args or args[0] != sys.executable:
        return None
    rest = args[1:]
    if rest[:1] == ["-u"]:
        rest = rest[1:]
    if len(rest) < 2 or rest[0] != "-m" or not rest[1].startswith("launch."):
        return None
    return rest[1], rest[2:]


def _zygote_env() -> dict[str, str]:
    """The zygote starts as the trainers it forks would (:func:`tests.support.trainer.trainer_env`)."""
    from tests.support.trainer import trainer_env  # that module imports this one

    return trainer_env()


def _same_start(env: dict[str, str]) -> bool:
    """Whether a fresh interpreter with ``env`` would start as the zygote did: what is read at start-up
    (``PYTHONPATH``: e.g. the NCCL rule's ``sitecustomize``; the OpenMP threads) is the same, and fresh
    interpreters were not asked for."""
    if os.environ.get(OFF_ENV) == "0" or env.get(FORK_ENV) == "0":
        return False
    ours = _zygote_env()
    same_threads = all(
        env.get(k) == ours.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED")
    )
    return env.get("PYTHONPATH", ours["PYTHONPATH"]) == ours["PYTHONPATH"] and same_threads


def popen(
    cmd: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    stdout: Any = None,
    stderr: Any = None,
    text: bool = False,
    start_new_session: bool = False,
) -> Child | subprocess.Popen:
    """:class:`subprocess.Popen` for ``cmd``, forked from the zygote where it can be (module doc)."""
    full_env = dict(os.environ if env is None else env)
    found = _module_of(cmd)
    if found is None or not _same_start(full_env):
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=stdout,
            stderr=stderr,
            text=text,
            start_new_session=start_new_session,
        )
    theirs: list[int] = []  # the child's stdout and stderr (the write ends of our pipes: closed once sent)
    streams: list[IO | None] = []
    for inherited, target in ((1, stdout), (2, stderr)):
        if target == subprocess.PIPE:
            r, w = os.pipe()
            theirs.append(w)
            f: IO = open(r, "rb")  # noqa: SIM115  (closed by communicate or the caller)
            streams.append(io.TextIOWrapper(f, errors="replace") if text else f)
        elif target == subprocess.DEVNULL:
            theirs.append(os.open(os.devnull, os.O_WRONLY))
            streams.append(None)
        elif target == subprocess.STDOUT:
            theirs.append(theirs[0])
            streams.append(None)
        elif target is None:
            theirs.append(inherited)
            streams.append(None)
        else:
            theirs.append(target if isinstance(target, int) else target.fileno())
            streams.append(None)
    module, args = found
    req = {
        "module": module,
        "args": args,
        "command": list(cmd),
        "env": full_env,
        "cwd": str(cwd or os.getcwd()),
        "new_session": start_new_session,
    }
    zygote = _the_zygote()
    try:
        pid = zygote.start(req, theirs)
    finally:
        for fd, target in zip(theirs, (stdout, stderr), strict=True):
            if target in (subprocess.PIPE, subprocess.DEVNULL):
                os.close(fd)
    return Child(zygote, pid, cmd, streams[0], streams[1])


def uploader() -> Started:
    """A checkpoint uploader for a :class:`launch.checkpoint.Checkpointer` made in this process (pass it
    as ``spare``), forked from the zygote: :func:`launch.uploader.start` can fork only from a process with
    no threads, and an xdist worker has some, so it would exec one (2-3 CPU-s of imports)."""
    env = fresh_uploader_env()  # what launch.uploader.start gives a fresh interpreter
    if not _same_start(env):
        return start_uploader()
    ours, theirs = socket.socketpair()
    zygote = _the_zygote()
    req = {
        "module": "launch.uploader",
        "args": ["{fd}"],
        "command": [sys.executable, "-m", "launch.uploader", "{fd}"],
        "env": env,
        "cwd": os.getcwd(),
        "new_session": False,
    }
    try:
        pid = zygote.start(req, [1, 2, theirs.fileno()])
    finally:
        theirs.close()
    return Child(zygote, pid, req["command"], None, None), Connection(ours.detach())


def run(
    cmd: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    capture_output: bool = False,
    text: bool = False,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """:func:`subprocess.run` for ``cmd``, forked from the zygote where it can be (module doc)."""
    pipe = subprocess.PIPE if capture_output else None
    proc = popen(cmd, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=text)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])))
