"""Ranks and uploaders forked from an imported state (launch.forking): a forked child behaves as the
fresh interpreter it stands for (exit status, signals, descriptors, exit handlers, environment, title),
torchrun's worker start takes the fork for our trainer only, and a run trains bitwise the same either way.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import forking
from schemas.contract import FORK_ENV
from tests.support.trainer import REPO, assert_identical, final_state, run_trainer, tiny_spec, write_spec


def _run(target, tmp_path: Path, **kw) -> tuple[int, str]:
    with open(tmp_path / "stderr", "w+") as err:
        proc = forking.fork_call(target, ["child", "--flag"], stderr=err, **kw)
        code = proc.wait(timeout=60)
        err.seek(0)
        return code, err.read()


def _exit_with(value: object):
    def target() -> None:
        raise SystemExit(value)

    return target


def _raise() -> None:
    raise ValueError("boom in the child")


@pytest.mark.parametrize(
    ("target", "code", "said"),
    [
        (lambda: None, 0, ""),
        (lambda: 3, 3, ""),
        (_exit_with(None), 0, ""),
        (_exit_with(4), 4, ""),
        (_exit_with("a message"), 1, "a message"),
        (_raise, 1, "ValueError: boom in the child"),
    ],
)
def test_exit_status_follows_a_fresh_interpreters_rules(tmp_path, target, code, said):
    got, err = _run(target, tmp_path)
    assert got == code
    assert said in err
    if not said:
        assert err == ""


def test_keyboard_interrupt_ends_the_child_by_sigint(tmp_path):
    def target() -> None:
        raise KeyboardInterrupt

    got, _ = _run(target, tmp_path)
    assert got == -signal.SIGINT


def test_the_child_gets_its_own_handlers_descriptors_environment_argv_and_title(tmp_path):
    report, parents_exit, own_exit = tmp_path / "report.json", tmp_path / "parent-atexit", tmp_path / "own"
    listener = socket.create_server(("127.0.0.1", 0))
    kept_a, kept_b = socket.socketpair()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    previous_int = signal.signal(signal.SIGINT, lambda *_: None)  # (xdist's workers ignore SIGINT)

    def parents_handler() -> None:
        parents_exit.write_text(str(os.getpid()))

    atexit.register(parents_handler)

    def target() -> int:
        def is_open(fd: int) -> bool:
            try:
                os.fstat(fd)
                return True
            except OSError:
                return False

        atexit.register(lambda: own_exit.write_text("ran"))
        cmdline = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()
        report.write_text(
            json.dumps(
                {
                    "usr1": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
                    "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                    "listener_open": is_open(listener.fileno()),
                    "kept_open": is_open(kept_b.fileno()),
                    "env": dict(os.environ),
                    "argv": sys.argv,
                    "cmdline": cmdline,
                    "sid": os.getsid(0) == os.getpid(),
                }
            )
        )
        return 0

    try:
        code, err = _run(
            target,
            tmp_path,
            argv=["x.py", "a"],
            env={"ONLY": "this"},
            new_session=True,
            keep_fds=[kept_b.fileno()],
        )
    finally:
        atexit.unregister(parents_handler)
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGINT, previous_int)
        listener.close()
        kept_a.close()
        kept_b.close()
    assert code == 0, err
    got = json.loads(report.read_text())
    assert got["usr1"] and got["sigint"]
    assert not got["listener_open"], "a socket of the parent (a rendezvous store) outlived the fork"
    assert got["kept_open"]
    assert got["env"] == {"ONLY": "this"}
    assert got["argv"] == ["x.py", "a"]
    assert got["cmdline"].startswith("child --flag")
    assert got["sid"]
    assert not parents_exit.exists(), "the parent's exit handler ran in the child"
    assert own_exit.read_text() == "ran", "the child's own exit handler did not run"


def test_wait_times_out_and_kill_ends_the_child(tmp_path):
    proc = forking.fork_call(lambda: time.sleep(60), ["sleeper"])
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.1)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert proc.poll() == -signal.SIGKILL
    proc.kill()  # a reaped child: nothing to signal, no error


def test_pixpro_fork_0_turns_it_off(monkeypatch):
    monkeypatch.setenv(FORK_ENV, "0")
    assert not forking.enabled()
    monkeypatch.setenv(FORK_ENV, "1")
    assert forking.enabled()


@pytest.mark.slow
def test_torchrun_forks_our_trainer_and_execs_anything_else(tmp_path):
    """launch.elastic's worker start: ``python -u -m <trainer> ARGS`` becomes a fork running the
    trainer's main in its own session and titled as the exec; any other command is exec'd."""
    code = textwrap.dedent(
        f"""
        import os, sys
        from launch import elastic, forking
        from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler

        def main(argv):
            leader = os.getsid(0) == os.getpid()
            open({str(tmp_path / "ran")!r}, "w").write(" ".join(argv) + " " + str(leader))
            return 5

        sys.modules["fake_trainer"] = type(sys)("fake_trainer")
        sys.modules["fake_trainer"].__file__ = "/x/fake_trainer.py"
        elastic.install(fork=("fake_trainer", main))
        start = lambda args: SubprocessHandler(sys.executable, args, {{}}, None, None, 0, None)
        forked = start(("-u", "-m", "fake_trainer", "a", "b"))
        other = start(("-c", "raise SystemExit(6)"))
        print(type(forked.proc).__name__, forked.proc.wait(), type(other.proc).__name__, other.proc.wait())
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ForkedProcess", "5", "Popen", "6"]
    assert (tmp_path / "ran").read_text() == "a b True"
    env[FORK_ENV] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[:2] == ["Popen", "1"], out.stderr  # exec'd: no module fake_trainer


@pytest.mark.slow
def test_forked_and_fresh_ranks_train_the_same_run_bitwise(tmp_path, data_root):
    """Two ranks under launch.run, forked from the agent (the default) and as fresh interpreters
    (PIXPRO_FORK=0): the same final checkpoint, bit for bit."""
    spec = write_spec(tmp_path / "spec.json", tiny_spec(data_root, optim__max_steps=4))
    states = {}
    for fork in ("1", "0"):
        run = tmp_path / f"run-fork-{fork}"
        res = run_trainer(spec, run, nproc=2, **{FORK_ENV: fork})
        assert res.returncode == 0, res.stderr[-3000:]
        states[fork] = final_state(str(run / "checkpoints"))
    assert states["1"]["__step__"] == 4
    assert_identical(states["1"], states["0"])


def test_a_device_check_that_poisons_fork_sends_gpu_children_back_to_exec():
    """torch's cudaGetDeviceCount (``torch.cuda.is_available()``, which torchrun's LaunchConfig calls in
    the agent) leaves forked children unable to use CUDA; forking.enabled() sees it, and where a GPU is
    visible declines the fork (the child would fail at its first CUDA call on a GPU node)."""
    code = textwrap.dedent(
        """
        import torch
        from launch import forking

        before = forking.fork_poisoned()
        torch.cuda.is_available()  # the check torchrun makes, NVML not answering (as here: no driver)
        after = forking.fork_poisoned()
        on_cpu = forking.enabled()  # poisoned, but no GPU to lose
        torch.cuda.device_count = lambda: 8  # as on a GPU node
        print(before, after, on_cpu, forking.enabled())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True", "False"]


def test_the_agents_nvml_device_check_stays_out_of_the_workers_env(monkeypatch):
    for name in (forking.NVML_CHECK_ENV, forking._SET_HERE_ENV):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    forking.spare_device_checks()
    assert os.environ[forking.NVML_CHECK_ENV] == "1"
    worker = forking.worker_env(dict(os.environ))
    assert forking.NVML_CHECK_ENV not in worker and not any("NVML" in k for k in worker)
    monkeypatch.setenv(forking.NVML_CHECK_ENV, "0")  # the user's own choice is theirs
    monkeypatch.delenv(forking._SET_HERE_ENV, raising=False)
    forking.spare_device_checks()
    assert forking.worker_env(dict(os.environ))[forking.NVML_CHECK_ENV] == "0"
