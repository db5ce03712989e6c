"""torchrun's agent, made safe for multi-node restarts; installed by :mod:`launch.run` in the agent process.

torchrun counts restarts per agent: a restart caused by another node's failure does not count on a
healthy node, so anything keyed on ``TORCHELASTIC_RESTART_COUNT`` (a store prefix, a checkpoint
attempt name, a log folder) disagrees across nodes after a remote failure. Here:

* every rendezvous round gets its own TCPStore (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), hosted by
  that round's rank 0 on a fresh port: no rank can read a key of an earlier round (a dead rank's
  address), so a restart is never spent on a stale address and no prefix is needed;
* the rendezvous round, the same on every node, reaches the workers as :data:`schemas.contract.ROUND_ENV`;
* a worker group that torchrun restarts or gives up on is stopped with SIGKILL at once, also where
  torch's own poll closes the other ranks as soon as one failed. Its ranks cannot agree on a checkpoint
  (one is dead), and a SIGTERM only sets their preemption flag while they sit in a collective or a
  store wait: torchrun would wait its 30 s grace before killing them anyway;
* a round's failed workers are reported to :mod:`launch.node_failures` (a node that keeps failing is
  left out of the next attempt): only those that failed before that close, by themselves. The ranks
  the close killed are not failures of the node, and counting them gave one event up to a record per
  GPU (two records leave a node out);
* each worker's stdout/stderr files are named by its global rank (:class:`RankLogsSpecs`), not by the
  node's local rank: the rendezvous, not the node index, decides which node holds rank 0;
* the rendezvous names the method that records each of its state changes with ``inspect.stack()``,
  twice, which reads the source of every frame and scans ``sys.modules`` for each: about 0.3 s of CPU
  a call in an agent that imported the trainer, 9 calls in a one-node round (benches/RESULTS.md).
  :func:`caller_name` reads the same name off the frame.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, LogsDest, Std, to_map
from torch.distributed.elastic.rendezvous import dynamic_rendezvous

from launch import forking
from launch.node_failures import RECORDER
from launch.preempt import held
from schemas.contract import AGENT_PID_ENV, ATTEMPT_ENV, PREEMPT_ENV, ROUND_ENV, round_suffix

KILL_WAIT_S = 10
_UNNAMED = f"local-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"  # a launch without PIXPRO_ATTEMPT


def rendezvous_round() -> int:
    """This worker's rendezvous round (0 for the first), the same on every node; torchrun's restart
    count where the agent is plain torchrun (one node: the same thing)."""
    return int(os.environ.get(ROUND_ENV) or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def caller_name(depth: int = 2) -> str:
    """torch's ``dynamic_rendezvous.get_method_name``: the function ``depth`` frames up, without
    building ``inspect.stack()`` (frame 0 is this function in both)."""
    try:
        return sys._getframe(depth).f_code.co_name
    except ValueError:
        return "no_method_name"


def install(fork: tuple[str, Callable[[list[str]], int]] | None = None, hold: Iterable[int] = ()) -> None:
    """Adjust torchrun's agent in this process (call before torch.distributed.run.main).

    ``fork``: ``(module, main)`` of a trainer this process has imported; a worker torchrun would start
    as ``python -u -m module ARGS`` is forked from here and runs ``main(ARGS)`` (:mod:`launch.forking`).
    ``hold``: the preemption signals, held in every worker until it has its handlers
    (:func:`launch.preempt.held`).
    """
    hold = tuple(hold)
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import PContext, SubprocessContext
    from torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler import (
        SubprocessHandler,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    join = DynamicRendezvousHandler.next_rendezvous

    def next_rendezvous(self: DynamicRendezvousHandler) -> Any:
        info = join(self)
        os.environ[ROUND_ENV] = str(self._state_holder.state.round)  # workers inherit os.environ
        return info

    def stop_workers(self: LocalElasticAgent, worker_group: Any, *args: Any, **kwargs: Any) -> None:
        self._shutdown(death_sig=signal.SIGKILL, timeout=KILL_WAIT_S)

    poll = SubprocessContext._poll
    close = PContext.close

    def poll_then_kill(self: SubprocessContext) -> Any:
        self._pixpro_polling = True  # type: ignore[attr-defined]
        try:
            return poll(self)
        finally:
            self._pixpro_polling = False  # type: ignore[attr-defined]

    def close_at_once(self: PContext, death_sig: signal.Signals | None = None, timeout: int = 30) -> None:
        """torch's poll closes the other ranks once one failed, with SIGTERM and a 30 s grace: SIGKILL
        them at once instead, and note first which ranks had failed by themselves."""
        if death_sig is None and getattr(self, "_pixpro_polling", False):
            self._pixpro_own_failures = set(getattr(self, "_failures", {}))  # type: ignore[attr-defined]
            death_sig, timeout = signal.SIGKILL, KILL_WAIT_S
        close(self, death_sig, timeout)

    monitor = LocalElasticAgent._monitor_workers

    def monitor_workers(self: LocalElasticAgent, worker_group: Any) -> Any:
        result = monitor(self, worker_group)
        if result.failures and not os.environ.get(PREEMPT_ENV) and self._pcontext is not None:
            own = getattr(self._pcontext, "_pixpro_own_failures", None)  # None: no close by the poll
            failed = {r: f for r, f in result.failures.items() if own is None or f.local_rank in own}
            RECORDER.failed(failed, dict(self._pcontext.stderrs))
        return result

    popen = SubprocessHandler._popen

    def fork_or_popen(self: SubprocessHandler, args: tuple, env: dict[str, str]) -> Any:
        env = forking.worker_env(env) | {AGENT_PID_ENV: str(os.getpid())}
        with held(hold):
            if fork is None or not forking.enabled() or args[:4] != (sys.executable, "-u", "-m", fork[0]):
                return popen(self, args, env)
            main, argv = fork[1], list(args[4:])
            return forking.fork_call(
                lambda: main(argv),
                list(args),
                argv=[sys.modules[fork[0]].__file__ or fork[0], *argv],  # as python -m sets it
                env=env,
                stdout=self._stdout,
                stderr=self._stderr,
                new_session=True,  # as torchrun's Popen: its close() signals the worker's process group
            )

    SubprocessHandler._popen = fork_or_popen  # type: ignore[method-assign]
    dynamic_rendezvous.get_method_name = caller_name
    DynamicRendezvousHandler.next_rendezvous = next_rendezvous  # type: ignore[method-assign]
    LocalElasticAgent._stop_workers = stop_workers  # type: ignore[method-assign]
    LocalElasticAgent._monitor_workers = monitor_workers  # type: ignore[method-assign]
    SubprocessContext._poll = poll_then_kill  # type: ignore[method-assign]
    PContext.close = close_at_once  # type: ignore[method-assign]


class RankLogsSpecs(DefaultLogsSpecs):
    """``<log_dir>/<attempt>[.r<round>]/rank<R>/{stdout,stderr}.log`` (torchrun ``--logs-specs pixpro``).

    ``<attempt>`` is the launcher's attempt id (the checkpoint prefixes use the same name), so the files
    of a restarted round sit beside, not over, those of the round before.
    """

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        attempt = round_suffix(os.environ.get(ATTEMPT_ENV) or _UNNAMED, rendezvous_round())
        base = os.path.join(self.root_log_dir, attempt)
        nprocs = len(envs)
        redirects, tees = to_map(self._redirects, nprocs), to_map(self._tee, nprocs)
        stdouts, stderrs = dict.fromkeys(range(nprocs), ""), dict.fromkeys(range(nprocs), "")
        tee_out: dict[int, str] = {}
        tee_err: dict[int, str] = {}
        errors: dict[int, str] = {}
        for local, env in envs.items():
            folder = os.path.join(base, f"rank{env['RANK']}")
            os.makedirs(folder, exist_ok=True)
            mode = redirects[local] | tees[local]  # a tee is a redirect that is also tailed
            if mode & Std.OUT == Std.OUT:
                stdouts[local] = os.path.join(folder, "stdout.log")
                if tees[local] & Std.OUT == Std.OUT:
                    tee_out[local] = stdouts[local]
            if mode & Std.ERR == Std.ERR:
                stderrs[local] = os.path.join(folder, "stderr.log")
                if tees[local] & Std.ERR == Std.ERR:
                    tee_err[local] = stderrs[local]
            errors[local] = os.path.join(folder, "error.json")
            env["TORCHELASTIC_ERROR_FILE"] = errors[local]
        return LogsDest(
            stdouts,
            stderrs,
            tee_out,
            tee_err,
            errors,
            os.path.join(base, "filtered_stdout.log"),
            os.path.join(base, "filtered_stderr.log"),
        )
