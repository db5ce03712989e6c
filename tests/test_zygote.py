"""tests/support/zygote.py: the tests' trainer processes forked from one that imported them once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.contract import FORK_ENV, STEP_PAUSE_ENV
from tests.support import zygote
from tests.support.procs import wait_for
from tests.support.trainer import REPO, tiny_spec, trainer_cmd, trainer_env, write_spec


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_a_launch_module_is_forked_by_the_zygote_and_exits_as_an_exec_would(tmp_path):
    missing = tmp_path / "missing.json"
    proc = zygote.popen(
        [sys.executable, "-m", "launch.train", str(missing)],
        cwd=REPO,
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert isinstance(proc, zygote.Child) and _ppid(proc.pid) == zygote._the_zygote().proc.pid
    out, err = proc.communicate(timeout=120)
    fresh = subprocess.run(
        [sys.executable, "-m", "launch.train", str(missing)],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, out, err) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert proc.returncode == 2 and err.startswith("pixpro: ") and len(err.splitlines()) == 1


def test_a_killed_child_reports_the_signal_and_its_title_is_the_command(tmp_path):
    spec = write_spec(tmp_path / "spec.json", tiny_spec(tmp_path / "data"))
    cmd, env = trainer_cmd(spec, tmp_path / "run"), trainer_env(**{STEP_PAUSE_ENV: "60"})  # still running
    proc = zygote.popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    title = " ".join(cmd).encode()
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    wait_for("the title", lambda: cmdline.read_bytes().replace(b"\0", b" ").strip() == title, 60, 0.01)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.slow
def test_what_a_fork_could_not_reproduce_is_exec_d(tmp_path):
    cmd = [sys.executable, "-m", "launch.run"]
    rule = {**trainer_env(), "PYTHONPATH": f"{REPO / 'tests' / 'support' / 'nccl_rule'}{os.pathsep}{REPO}"}
    for env in (rule, trainer_env(**{FORK_ENV: "0"}), {**trainer_env(), "OMP_NUM_THREADS": "4"}):
        proc = zygote.popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert isinstance(proc, subprocess.Popen) and proc.wait(timeout=120) == 2
    other = zygote.popen([sys.executable, "-c", "pass"], cwd=REPO, env=trainer_env())
    assert isinstance(other, subprocess.Popen) and other.wait(timeout=60) == 0


def test_an_uploader_from_the_zygote_keeps_its_socket_and_commits(tmp_path, monkeypatch):
    """:func:`zygote.uploader`: the socket reaches the forked uploader under the number in its title, and
    a Checkpointer in this (threaded) process saves through it and reads the state back."""
    import torch

    from launch.checkpoint import Checkpointer
    from launch.store import CheckpointStore

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as in an xdist worker: the start the zygote had
    monkeypatch.delenv("PYTHONPATH", raising=False)
    spare = zygote.uploader()
    proc = spare[0]
    assert isinstance(proc, zygote.Child) and _ppid(proc.pid) == zygote._the_zygote().proc.pid
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    title = f"{sys.executable} -m launch.uploader ".encode()
    wait_for("the title", lambda: cmdline.read_bytes().startswith(title), 60, 0.01)
    fd = cmdline.read_bytes().replace(b"\0", b" ").split()[-1].decode()
    assert os.path.exists(f"/proc/{proc.pid}/fd/{fd}"), fd
    ck = Checkpointer(CheckpointStore(str(tmp_path / "ckpt"), attempt="t"), 0, 1, spare=spare)
    try:
        state = {"w": torch.arange(10.0)}
        assert ck.save(3, state, {"rng": torch.get_rng_state()}, {"step": 3}, blocking=True)
        assert ck._proc is proc  # that uploader committed it, not a restarted one
        step, loaded, _ = ck.load_latest()  # type: ignore[misc]
    finally:
        ck.close()
    assert step == 3 and torch.equal(loaded["w"], state["w"])
    assert proc.wait(timeout=60) == 0
