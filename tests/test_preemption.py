"""Signals and crashes under torchrun (2 ranks, gloo): clean preempted exits, restarts, exact resume."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cluster.node_task import launcher_preexec
from cluster.nodes import failures as node_failures
from launch.preempt import EXIT_PREEMPTED, children_of
from schemas.contract import FORK_ENV
from tests.support import zygote
from tests.support.procs import free_port
from tests.support.shared import run_fixtures, run_once
from tests.support.store import local_pointer
from tests.support.trainer import (
    REPO,
    assert_identical,
    final_state,
    run_trainer,
    start_ranks,
    tiny_spec,
    trainer_cmd,
    trainer_env,
    write_spec,
)

pytestmark = [pytest.mark.slow]

STEPS = 30


def _spec(data_root: Path, **overrides) -> dict:
    # 24 images, 2 ranks x batch 2: 6 steps an epoch, 30 steps; workers on so their signal handling counts.
    base = {"data__batch_size": 2, "data__num_workers": 2, "optim__epochs": 5, "optim__max_steps": STEPS}
    return tiny_spec(data_root, **(base | overrides))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run, made once a session (tests/test_hang.py compares against it too)."""
    return run_once(tmp_path_factory, "preemption-golden", _spec(Path("data")), nproc=2)


data_root, golden = run_fixtures("uninterrupted")  # the tests train on its dataset, compare to its state


def _launch(spec: Path, run: Path, max_restarts: int = 0, **env: str) -> zygote.Child | subprocess.Popen:
    return start_ranks(spec, run, max_restarts=max_restarts, **env)


def _current_step(run: Path) -> int:
    step = -1
    for path in (run / "checkpoints" / "metrics").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                step = max(step, json.loads(line)["step"])
    return step


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _current_step(run) < step:
        assert proc.poll() is None, f"trainer ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "trainer too slow"
        time.sleep(0.05)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=["USR2", "TERM"])
def test_signal_to_every_process_commits_exits_preempted_and_resumes_exactly(
    tmp_path, data_root, golden, sig
):
    rng = random.Random(f"{sig.name}-{os.getpid()}")
    stop_after = rng.randint(2, STEPS - 8)
    spec = write_spec(tmp_path / "spec.json", _spec(data_root))
    run = tmp_path / "run"
    proc = _launch(spec, run)
    _wait_for_step(proc, run, stop_after)
    os.killpg(proc.pid, sig)  # like SLURM's --signal: the agent, both ranks and all DataLoader workers
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert _group_members(proc.pid) == [], "stray processes after the preempted exit"
    stopped = final_state(str(run / "checkpoints"))["__step__"]
    assert stop_after <= stopped < STEPS, (stop_after, stopped)

    res = run_trainer(spec, run, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {stopped}" in res.stderr
    assert_identical(golden, final_state(str(run / "checkpoints")))


def test_sigkill_of_one_rank_is_restarted_by_torchrun_from_the_last_checkpoint(tmp_path, data_root, golden):
    spec = write_spec(tmp_path / "spec.json", _spec(data_root))
    run = tmp_path / "run"
    proc = _launch(spec, run, max_restarts=3)
    _wait_for_step(proc, run, 10)
    workers = children_of(proc.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from step" in out
    # The first restart connects: no rank reads a dead rank's address left by the killed round.
    assert "Connection refused" not in out, out[-3000:]
    assert_identical(golden, final_state(str(run / "checkpoints")))


def test_a_preemption_during_the_launchers_imports_ends_the_attempt_preempted(tmp_path, data_root):
    """SLURM's signal can come while the node's launcher still imports torch (seconds, before it has
    its handlers): the node task starts it with the preemption signals held, so the signal waits for
    the handlers and the attempt ends preempted (requeued), not killed by the signal (failed)."""
    spec = write_spec(tmp_path / "spec.json", _spec(data_root))
    held = frozenset({signal.SIGTERM, signal.SIGUSR2})
    proc = subprocess.Popen(  # a fresh interpreter, as the node task starts it: imports and all
        trainer_cmd(spec, tmp_path / "run", nproc=2),
        cwd=REPO,
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=functools.partial(launcher_preexec, held),
    )
    time.sleep(0.3)  # well inside the imports
    assert _mask(proc.pid) == {"SigBlk": True, "SigCgt": False}  # held, no handler yet
    os.kill(proc.pid, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]


def test_a_preemption_during_an_execd_ranks_imports_ends_the_attempt_preempted(tmp_path, data_root):
    """A rank started as a fresh interpreter (``PIXPRO_FORK=0``, or a GPU node where fork is unsafe)
    imports for seconds before it has its handlers; the signal, sent to every process of the step as
    SLURM sends it, waits for them, and the attempt ends preempted instead of failed."""
    spec = write_spec(tmp_path / "spec.json", _spec(data_root))
    proc = _launch(spec, tmp_path / "run", **{FORK_ENV: "0"})
    deadline = time.monotonic() + 120
    while not (ranks := [p for p in children_of(proc.pid) if b"launch.train" in _cmdline(p)]):
        assert proc.poll() is None and time.monotonic() < deadline, "no rank started"
        time.sleep(0.01)
    for pid in [proc.pid, *ranks]:
        os.kill(pid, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]


def _mask(pid: int, sig: int = signal.SIGUSR2) -> dict[str, bool]:
    """Whether ``sig`` is blocked and whether it has a handler in process ``pid`` (/proc status)."""
    fields = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: bool(int(fields[key], 16) >> (sig - 1) & 1) for key in ("SigBlk", "SigCgt")}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _nccl_rule_run(spec: Path, run: Path, **env: str) -> subprocess.CompletedProcess:
    """Two ranks under torchrun whose default process group refuses CPU tensors as NCCL does."""
    rule = REPO / "tests" / "support" / "nccl_rule"
    base = trainer_env(**env)
    base["PYTHONPATH"] = f"{rule}{os.pathsep}{base['PYTHONPATH']}"
    return subprocess.run(
        trainer_cmd(spec, run, nproc=2), cwd=REPO, env=base, capture_output=True, text=True, timeout=300
    )


def test_control_plane_obeys_nccls_device_rule_and_resumes_exactly(tmp_path, data_root, golden):
    """Why this test exists: NCCL refuses CPU tensors, gloo accepts them. The trainer's control plane
    (the attempt name, the demo data's barrier, the per-step preempt/save agreement, the resume
    agreement, the closing barrier) all-reduced CPU tensors on the default group, which is NCCL on a
    GPU node: every multi-GPU run would have crashed at its first collective while every CPU test
    passed. Here the default group is built as "cuda:gloo", which refuses CPU tensors exactly as NCCL
    does; the run stops at step 7 (a committed checkpoint), resumes, and ends bitwise equal to the
    plain gloo run, with synchronized BN and DDP on the data plane's own gloo group."""
    spec = write_spec(tmp_path / "spec.json", _spec(data_root))
    run = tmp_path / "run"
    first = _nccl_rule_run(spec, run, PIXPRO_STOP_AT_STEP="7")
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-3000:]
    marker = "nccl-rule: default process group built as cuda:gloo"
    assert first.stderr.count(marker) == 2, first.stderr[-3000:]  # both ranks ran under the rule
    second = _nccl_rule_run(spec, run)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 7" in second.stderr
    assert_identical(golden, final_state(str(run / "checkpoints")))


def test_world_size_two_to_one_finishes_the_epoch_with_the_remaining_samples(tmp_path, data_root):
    spec = write_spec(tmp_path / "spec.json", _spec(data_root, optim__max_steps=9))
    run = tmp_path / "run"
    assert run_trainer(spec, run, nproc=2, PIXPRO_STOP_AT_STEP="4").returncode == EXIT_PREEMPTED
    res = run_trainer(spec, run, nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size changed to 1" in res.stderr
    state = final_state(str(run / "checkpoints"))
    sampler = state["train.pt"]["state"]["sampler"]
    # 2 ranks x 2 consume 16 of 24 images in 4 steps; one rank then needs 4 steps of 2 for the other 8
    # (steps 5-8), and step 9 opens epoch 1.
    assert state["train.pt"]["state"]["progress"]["step"] == 9
    assert (sampler["epoch"], sampler["consumed"]) == (1, 2)


# --- two torchrun agents ("nodes") on one machine: restarts agree on the round across nodes ----------
class _Agents:
    """Two ``launch.run`` agents, one rank each, meeting through the c10d rendezvous on 127.0.0.1:
    what a 2-node SLURM job runs, without SLURM. Each agent's output goes to its own file."""

    def __init__(
        self, spec: Path, run: Path, attempt: str, max_restarts: int, tee: bool = False, **env: str
    ) -> None:
        self.logs = [run.parent / f"{attempt}.agent{i}.log" for i in range(2)]
        port = free_port()
        self.procs = []
        for node, log in enumerate(self.logs):
            cmd = [
                *trainer_cmd(spec, run, nproc=2, max_restarts=max_restarts)[:3],
                "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", attempt,
                "--rdzv-conf", f"is_host={int(node == 0)}", f"--max-restarts={max_restarts}",
                "--log-dir", str(run / "logs"), "--logs-specs", "pixpro", *(["--tee", "3"] if tee else []),
                "--", str(spec), "--run-dir", str(run),
            ]  # fmt: skip
            with open(log, "w") as out:
                self.procs.append(
                    zygote.popen(
                        cmd,
                        cwd=REPO,
                        env=trainer_env(PIXPRO_ATTEMPT=attempt, SLURMD_NODENAME=f"node{node}", **env),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def output(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)

    def trainer(self, agent: int) -> int:
        found = children_of(self.procs[agent].pid)
        assert len(found) == 1, (agent, found)
        return found[0]

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                self.kill()
                tail = self.output()[-4000:]
                raise AssertionError(f"agents still running after {timeout:.0f}s:\n{tail}") from exc
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            for pid in [*children_of(p.pid), p.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def _wait_until(what: str, predicate, agents: _Agents, timeout: float) -> float:
    """Seconds until ``predicate()`` held; fails (with the agents' output) if an agent ended first."""
    t0 = time.monotonic()
    while not predicate():
        ended = [p.returncode for p in agents.procs if p.poll() is not None]
        if ended or time.monotonic() - t0 > timeout:
            agents.kill()
            raise AssertionError(f"{what}: agents ended {ended} / timed out\n{agents.output()[-4000:]}")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_sigkill_on_either_node_restarts_every_node_in_one_round_and_ends_exact(tmp_path, data_root, golden):
    rng = random.Random(os.getpid())
    spec = write_spec(tmp_path / "spec.json", _spec(data_root))
    run = tmp_path / "run"
    agents = _Agents(spec, run, "job7.0", max_restarts=3)
    recoveries = []
    kill_at = rng.randint(4, 8)  # after the first commit (every 3 steps): the restart resumes from it
    committed = functools.partial(local_pointer, run / "checkpoints")
    for n, agent in enumerate((1, 0)):  # a rank on the second node, then one on the first
        _wait_until(f"step {kill_at}", lambda s=kill_at: _current_step(run) >= s and committed(), agents, 180)
        os.kill(agents.trainer(agent), signal.SIGKILL)
        recoveries.append(
            _wait_until(
                f"restart {n + 1} (kill at step {kill_at} on agent {agent})",
                lambda n=n: agents.output().count("resumed from step") >= n + 1,
                agents,
                120,
            )
        )
        kill_at = _current_step(run) + rng.randint(2, 6)
    assert agents.wait(timeout=240) == [0, 0], agents.output()[-4000:]
    out = agents.output()
    assert "Connection refused" not in out, out[-4000:]
    # Both nodes named the restarted rounds alike: one attempt name per round, all ranks in one prefix.
    assert_identical(golden, final_state(str(run / "checkpoints")))
    # Files by global rank, one folder per round, whichever node held the rank.
    folders = {p.name: sorted(q.name for q in p.iterdir()) for p in (run / "logs").iterdir()}
    assert folders == {a: ["rank0", "rank1"] for a in ("job7.0", "job7.0.r1", "job7.0.r2")}, folders
    prefixes = {p.name.split(".", 1)[1] for p in (run / "checkpoints").glob("step-*")}
    assert prefixes <= {"job7.0", "job7.0.r1", "job7.0.r2"}, prefixes
    # Each node is blamed once, for its own killed rank; the peer that lost its partner is not blamed.
    blamed = sorted((f.node, f.cause) for f in node_failures(run))
    assert blamed == [("node0", "killed by SIGKILL"), ("node1", "killed by SIGKILL")], blamed
    print(f"recovery after SIGKILL: {', '.join(f'{s:.1f}s' for s in recoveries)}")


def test_sigkill_with_a_concurrent_preemption_commits_and_resumes_exact(tmp_path, data_root, golden):
    spec = write_spec(tmp_path / "spec.json", _spec(data_root))
    run = tmp_path / "run"
    agents = _Agents(spec, run, "job8.0", max_restarts=3)
    _wait_until("step 6", lambda: _current_step(run) >= 6, agents, 180)
    os.kill(agents.trainer(0), signal.SIGKILL)
    for p in agents.procs:  # the preemption signal reaches both agents as the rank dies
        os.kill(p.pid, signal.SIGUSR2)
    codes = agents.wait(timeout=180)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], agents.output()[-4000:]
    stopped = final_state(str(run / "checkpoints"))["__step__"]
    assert stopped < STEPS
    again = _Agents(spec, run, "job8.1", max_restarts=0)
    assert again.wait(timeout=240) == [0, 0], again.output()[-4000:]
    assert f"resumed from step {stopped}" in again.output()
    assert_identical(golden, final_state(str(run / "checkpoints")))
