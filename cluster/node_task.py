"""What runs on each node of a job: the trainer launcher as a child process, made requeue-safe.

submitit pickles a :class:`NodeTask` and calls it once per node (one task per node). It starts
``launch.run`` (torchrun + trainers) in its own process group and waits. On the preemption signal
submitit calls :meth:`NodeTask.checkpoint` on node 0: the trainers got the same signal from SLURM,
so it waits until they committed a checkpoint and exited, then hands submitit a
``DelayedSubmission`` of itself so the same job id is requeued; the next attempt resumes from the
checkpoint's ``latest`` pointer by itself. No torch here: this runs in the submitit task process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.record import RunRecord
from cluster.torchrun import (
    LOCAL_ENDPOINT,
    NodeCommand,
    Placement,
    first_host,
    node_command,
    port_free,
    rdzv_port,
    shell_join,
)
from schemas.contract import (
    PREEMPT_WINDOW_ENV,
    STATUS_FILE,
    TERM_WINDOW_ENV,
    TIME_LIMIT_AT_ENV,
    Exit,
    RunPaths,
    applicable_window,
    atomic_write,
    preemption_deadlines,
    preemption_signals,
    user_signal,
)

EXIT_PREEMPTED = Exit.PREEMPTED  # launch.run: checkpoint committed, resume me
POLL_S = 0.2
REQUEUE_SETTLE_S = 60.0


class TrainerFailed(RuntimeError):
    """launch.run exited with a failure status; the job ends FAILED with this message in its log."""

    def __init__(self, message: str, status: int = Exit.FAILURE) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class JobContext:
    """Where this node task runs: job id, restart count, node index and the rendezvous endpoint."""

    job_id: str
    restart: int
    node: int
    nnodes: int
    endpoint: str
    slurm: bool

    @property
    def attempt(self) -> str:
        return f"{self.job_id}.{self.restart}" if self.slurm else self.job_id

    @property
    def placement(self) -> Placement:
        return Placement(self.job_id, self.endpoint, "1" if self.node == 0 else "0", self.attempt)

    @classmethod
    def local(cls, job_id: str) -> JobContext:
        """The local executor's one node: the store takes any free port."""
        return cls(job_id=job_id, restart=0, node=0, nnodes=1, endpoint=LOCAL_ENDPOINT, slurm=False)

    @classmethod
    def from_slurm_env(cls) -> JobContext:
        """One node: the store takes any free port (single-node jobs share nodes, and no other node
        needs to find it); several: the first host, at a port every node derives from the job."""
        env = os.environ
        job_id = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_JOB_ID"):  # as the run record names it
            job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        restart = int(env.get("SLURM_RESTART_COUNT") or 0)
        nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        if nnodes == 1:
            endpoint = LOCAL_ENDPOINT
        else:
            endpoint = f"{first_host(env['SLURM_JOB_NODELIST'])}:{rdzv_port(job_id, restart)}"
        return cls(
            job_id=job_id,
            restart=restart,
            node=int(env.get("SLURM_NODEID") or 0),
            nnodes=nnodes,
            endpoint=endpoint,
            slurm=True,
        )


def launcher_preexec(held: frozenset[int]) -> None:
    """preexec of the launcher: it gets SIGTERM (and checkpoints) if this task is killed outright; and it
    starts with the preemption signals ``held`` (blocked; the mask survives exec) until it has its
    handlers, so that one arriving during its imports waits instead of killing it (the user signal's
    default action) and failing the attempt (launch.preempt.held)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class NodeTask:
    """Picklable (no torch, no open handles in its state) callable for submitit and the local runner."""

    _CONFIG = (
        "run_id", "run_dir", "workdir", "nodes", "gpus_per_node", "max_restarts",
        "signal_name", "signal_lead_s", "checkpoint_url", "storage_options", "python",
    )  # fmt: skip

    def __init__(
        self,
        *,
        run_id: str,
        run_dir: str,
        workdir: str,
        nodes: int,
        gpus_per_node: int,
        max_restarts: int,
        signal_name: str,
        signal_lead_s: int,
        checkpoint_url: str = "",
        storage_options: dict[str, Any] | None = None,
        python: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.run_dir = run_dir
        self.workdir = workdir
        self.nodes = nodes
        self.gpus_per_node = gpus_per_node
        self.max_restarts = max_restarts
        self.signal_name = signal_name
        self.signal_lead_s = signal_lead_s
        self.checkpoint_url = checkpoint_url
        self.storage_options = dict(storage_options or {})
        self.python = python
        self._reset()

    @classmethod
    def for_run(cls, record: RunRecord) -> NodeTask:
        res = record.resources
        return cls(
            run_id=record.run_id,
            run_dir=record.run_dir,
            workdir=record.workdir,
            nodes=record.nodes,
            gpus_per_node=record.gpus_per_node,
            max_restarts=int(res.get("max_restarts", 0)),
            signal_name=str(res.get("signal", "USR2")),
            signal_lead_s=int(res.get("signal_lead_s", 120)),
            checkpoint_url=record.checkpoint_url,
            storage_options=record.storage_options,
        )

    def _reset(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._rc: int | None = None
        self._ctx: JobContext | None = None
        self._window: int | None = None  # seconds from a preemption's signal to SIGKILL, where known
        self._ends_at: float | None = None  # the job's end time: its time limit's signal comes lead before
        self._term_window: int | None = None  # seconds from a SIGTERM to SIGKILL, where known

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._CONFIG}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        return f"NodeTask(run_id={self.run_id!r}, nodes={self.nodes}, gpus_per_node={self.gpus_per_node})"

    # --- the command ---------------------------------------------------------------------------
    def launch(self, ctx: JobContext) -> NodeCommand:
        """The launcher command of this node (:func:`cluster.torchrun.node_command`, as ``--dry-run``)."""
        return node_command(
            self.run_dir,
            ctx.placement,
            nodes=ctx.nnodes,
            gpus_per_node=self.gpus_per_node,
            max_restarts=self.max_restarts,
            signal=self.signal_name,
            python=self.python,
        )

    def command(self, ctx: JobContext) -> list[str]:
        return self.launch(ctx).argv

    def environment(self, ctx: JobContext) -> dict[str, str]:
        env = {**os.environ, **self.launch(ctx).env}
        if self._window is not None:
            env[PREEMPT_WINDOW_ENV] = str(self._window)
        if self._ends_at is not None:
            env[TIME_LIMIT_AT_ENV] = f"{self._ends_at:.0f}"
        if self._term_window is not None:
            env[TERM_WINDOW_ENV] = str(self._term_window)
        return env

    def _read_kill_times(self, ctx: JobContext) -> None:
        """SLURM kills a preempted job its partition's GraceTime + KillWait after the signal, whatever
        ``resources.signal_lead_s`` says: a preemption's final save and :meth:`checkpoint` budget for it
        (the time limit's signal, lead before the job's end, keeps the lead); a SIGTERM, KillWait after
        ``scancel`` and ``scontrol requeue``, budgets for that."""
        from cluster import slurm

        found = slurm.kill_times(os.environ.get("SLURM_JOB_PARTITION"), os.environ.get("SLURM_JOB_ID"))
        if found is None:
            _say("when SLURM kills a preempted job is unknown (scontrol did not say): budgets from the lead")
            return
        self._ends_at = found.ends_at
        self._term_window = found.term_window_s
        if not found.preemptible:
            return
        self._window = found.window_s
        if self._window < self.signal_lead_s:
            _say(
                f"a preemption is killed {self._window} s after its signal (GraceTime {found.grace_s} s + "
                f"KillWait {found.kill_wait_s} s), sooner than resources.signal_lead_s "
                f"{self.signal_lead_s}: a preemption's budgets come from it (attempt {ctx.attempt})"
            )

    # --- running -------------------------------------------------------------------------------
    def __call__(self) -> int:
        """submitit's entry point on a SLURM node."""
        ctx = JobContext.from_slurm_env()
        if ctx.nnodes != self.nodes:
            raise TrainerFailed(f"allocation has {ctx.nnodes} nodes, the run asks for {self.nodes}")
        if ctx.node == 0 and self._on_left_out_node(ctx):
            return EXIT_PREEMPTED
        rc = self.run(ctx)
        if rc == EXIT_PREEMPTED:
            return self._requeue_after_stop(ctx)
        return rc

    def run(self, ctx: JobContext) -> int:
        """Start the launcher and wait; 0 and 75 are returned, anything else raises TrainerFailed."""
        self._ctx = ctx
        self._check_port(ctx)
        if ctx.slurm:
            self._read_kill_times(ctx)
        cmd = self.command(ctx)
        _say(f"attempt {ctx.attempt} node {ctx.node}/{ctx.nnodes}: {shell_join(cmd)}")
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=self.environment(ctx),
            start_new_session=True,  # its own process group: signalled and reaped as one
            preexec_fn=functools.partial(launcher_preexec, frozenset(preemption_signals(self.signal_name))),
        )
        threading.Thread(target=self._reap, name="pixpro-reap", daemon=True).start()
        rc = self.wait()
        assert rc is not None
        _say(f"attempt {ctx.attempt} node {ctx.node}: launcher exited with status {rc}")
        if rc not in (Exit.OK, EXIT_PREEMPTED) and self.trainer_completed(ctx):
            _say(f"the trainer had completed attempt {ctx.attempt} (status.json); status {rc} came after")
            rc = Exit.OK
        if rc not in (Exit.OK, EXIT_PREEMPTED):
            raise TrainerFailed(
                f"trainer exited with status {rc} (attempt {ctx.attempt}; see the log above)", rc
            )
        return rc

    @staticmethod
    def _check_port(ctx: JobContext) -> None:
        """Node 0 hosts the rendezvous store: a taken port fails now in one line, not after every
        node's connect timeout in a rendezvous traceback."""
        host, _, port = ctx.endpoint.rpartition(":")
        if ctx.node == 0 and int(port) and not port_free(int(port)):
            raise TrainerFailed(
                f"rendezvous port {port} on {host} is in use by another process (attempt {ctx.attempt}); "
                "a resubmission (pixpro resume) gets another port from its new job id"
            )

    def trainer_completed(self, ctx: JobContext) -> bool:
        """status.json says this attempt trained to the end (a late signal may still kill a rank that
        is tearing down: its handlers are gone then, and the launcher reports a failure)."""
        if not self.checkpoint_url:
            return False
        try:
            from cluster.progress import open_run_store

            data = open_run_store(self.checkpoint_url, self.storage_options).read_aux(STATUS_FILE)
            status = json.loads(data or b"{}")
        except Exception:
            return False
        return (
            status.get("state") == "completed"
            and status.get("attempt") == ctx.attempt
            and status.get("step") is not None
            and status.get("step") == status.get("total_steps")
        )

    def _reap(self) -> None:
        assert self._proc is not None
        self._rc = self._proc.wait()

    def wait(self, timeout: float | None = None) -> int | None:
        """Poll (never block in Popen.wait: signal handlers call this while the main thread waits)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._rc is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(POLL_S)
        return self._rc

    def forward(self, sig: int) -> None:
        """Send a signal to the launcher's whole process group (torchrun, trainers, loader workers)."""
        if self._proc is not None and self._rc is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)

    def cancelled(self) -> bool:
        return RunPaths(self.run_dir).cancel_marker.exists()

    # --- preemption ------------------------------------------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on node 0 when the preemption/timeout signal arrives.

        The trainers received the same signal from SLURM (it goes to every process of the step; it is
        forwarded here too in case only this process got it). Wait for them to commit and exit, then
        ask for a requeue of the same job id. Returning before the commit would let SLURM kill the
        step a second later with the checkpoint half written.
        """
        from submitit.helpers import DelayedSubmission

        self.forward(user_signal(self.signal_name))
        window = applicable_window(self._window, self._ends_at, self.signal_lead_s, time.time())
        _, budget = preemption_deadlines(self.signal_lead_s, window)
        rc = self.wait(timeout=budget) if self._proc is not None else None
        _say(f"preemption signal: launcher status {rc!r} after waiting up to {budget:.0f}s")
        late = rc not in (None, EXIT_PREEMPTED) and self._ctx and self.trainer_completed(self._ctx)
        if rc == Exit.OK or late:
            _say("training completed before the preemption took effect: not requeued")
            sys.exit(Exit.OK)
        if rc is not None and rc != EXIT_PREEMPTED:
            raise TrainerFailed(f"trainer exited with status {rc} while being preempted", rc)
        if self.cancelled():
            _say("run cancelled by the user: not requeued")
            return None
        return DelayedSubmission(self)

    def _requeue_after_stop(self, ctx: JobContext) -> int:
        """The trainers stopped with a checkpoint (SIGTERM: ``scontrol requeue``, preemption without the
        user signal, ``scancel --signal=TERM``) but submitit saw no user signal: requeue from node 0,
        unless the user cancelled (then SLURM is ending the job anyway)."""
        if ctx.node != 0 or self.cancelled() or self._scancelled(ctx):
            return EXIT_PREEMPTED
        proc = subprocess.run(
            ["scontrol", "requeue", ctx.job_id], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode != 0:
            _say(f"not requeued here ({' '.join(proc.stderr.split()) or proc.returncode}); SLURM decides")
            return EXIT_PREEMPTED
        self._exclude(ctx.job_id, self._left_out())
        _say(f"requeued job {ctx.job_id}; waiting to be stopped by SLURM")
        time.sleep(REQUEUE_SETTLE_S)
        return EXIT_PREEMPTED

    def _scancelled(self, ctx: JobContext) -> bool:
        """A plain ``scancel`` is a SIGTERM too, with no marker of ours: the accounting says CANCELLED
        from that moment, so the job is not requeued (that would undo the cancel) and the run is marked
        cancelled as ``pixpro cancel`` marks it (``pixpro resume`` clears it). Where the accounting does
        not answer, the SIGTERM requeues as any other."""
        from cluster import slurm

        state = slurm.accounting_state(ctx.job_id)
        if state is None:
            _say(
                f"the accounting does not say whether job {ctx.job_id} was cancelled (a jobcomp-only "
                "cluster?): requeued as after any SIGTERM; pixpro cancel stops a run for good"
            )
            return False
        if state != "CANCELLED":
            return False
        _say(f"job {ctx.job_id} was cancelled (scancel): not requeued; the run is marked cancelled")
        with contextlib.suppress(OSError):
            atomic_write(RunPaths(self.run_dir).cancel_marker, f"{time.time()}\n".encode())
        return True

    # --- nodes that keep failing -----------------------------------------------------------------
    def _left_out(self) -> list[str]:
        from cluster import nodes
        from cluster.record import read_local

        try:
            return nodes.excluded(read_local(Path(self.run_dir)))
        except (OSError, ValueError):
            return []

    def _own_exclude(self) -> str:
        """The spec's ``resources.extra_sbatch.exclude`` (as submitted), '' when the record does not say."""
        from cluster.record import read_local

        try:
            extra = read_local(Path(self.run_dir)).resources.get("extra_sbatch") or {}
        except (OSError, ValueError):
            return ""
        return str(extra.get("exclude") or "")

    def _exclude(self, job_id: str, left_out: list[str]) -> None:
        """A requeued job is pending again: only now does SLURM take a new exclude list for it. The list
        replaces the job's, so it keeps what the job excluded already (the user's own ``--exclude`` and
        the nodes left out at submission) and the spec's, and adds ``left_out``."""
        if not left_out:
            return
        shown = _scontrol("show", "job", job_id) or ""
        current = re.search(r"\bExcNodeList=(\S+)", shown)
        lists = [current[1] if current and current[1] != "(null)" else "", self._own_exclude()]
        before = [node for hosts in lists if hosts for node in _hostnames(hosts)]
        union = ",".join(dict.fromkeys([*before, *left_out]))
        _scontrol("update", f"JobId={job_id}", f"ExcNodeList={union}")

    def _on_left_out_node(self, ctx: JobContext) -> bool:
        """A requeue (preemption) came back on a node that failed this run twice since the job was
        queued: requeue again, without it. A new job (``pixpro resume``) has it in ``--exclude``."""
        left_out = self._left_out()
        if not left_out:
            return False
        hosts = _scontrol("show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", ""))
        bad = sorted(set(left_out) & set((hosts or "").split()))
        if not bad or _scontrol("requeue", ctx.job_id) is None:
            return False
        _say(f"attempt {ctx.attempt} got {', '.join(bad)}, which failed this run twice: requeued without it")
        self._exclude(ctx.job_id, left_out)
        time.sleep(REQUEUE_SETTLE_S)
        return True


def _scontrol(*args: str) -> str | None:
    """scontrol's output, or None (said in the log) when it refuses."""
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        _say(f"scontrol {args[0]} failed: {' '.join(proc.stderr.split()) or proc.returncode}")
        return None
    return proc.stdout


def _hostnames(hosts: str) -> list[str]:
    """A SLURM host list (``node[1-3],gpu7``) as names; the list itself where scontrol cannot expand it."""
    expanded = _scontrol("show", "hostnames", hosts)
    return expanded.split() if expanded else [hosts]


def _say(message: str) -> None:
    print(f"pixpro: {message}", file=sys.stderr, flush=True)
