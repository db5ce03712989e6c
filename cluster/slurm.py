"""Talking to SLURM: the sbatch parameters of a run, checks before submitting, submission through
submitit, and batched state queries (one ``sacct`` and one ``squeue`` call for any number of jobs).

Imports neither torch nor submitit at module level (``pixpro status`` uses the query half).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.errors import Failure, UsageError
from schemas.contract import MAX_LINE, one_line

if TYPE_CHECKING:
    from schemas import RunSpec

TIMEOUT_S = 60
STATUS_TIMEOUT_S = 10.0
"""How long ``pixpro status`` waits for ``squeue``/``sacct`` (SLURM's default MessageTimeout): with the
controller down it lists the runs, their SLURM state UNKNOWN, instead of waiting a minute."""
MAX_TIME_LIMITS = 10**9
"""submitit's ``max_num_timeout``: how many time-limit signals a job may be requeued after. Its
default, 3, ends a run longer than four time limits (``UncompletedJobError`` after the checkpoint);
every pixpro segment ends with a committed checkpoint, so there is no reason for a bound."""
TERMINAL = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
)  # fmt: skip


def available() -> bool:
    return shutil.which("sbatch") is not None


@dataclass
class Started:
    """A SLURM command started now and waited for later: ``pixpro status`` runs ``squeue`` and ``sacct``
    side by side (sacct's answer comes through slurmdbd and takes the longer)."""

    args: list[str]
    proc: subprocess.Popen[str] | None
    stdin: str | None = None
    deadline: float = 0.0
    timeout_s: float = TIMEOUT_S
    unstarted: str = ""
    """Why the command could not start (``proc`` is None)."""

    def wait(self) -> subprocess.CompletedProcess[str]:
        """The command's output; :class:`Failure` if it could not start or is silent past its
        deadline (:data:`TIMEOUT_S` after its start unless set)."""
        if self.proc is None:
            raise Failure(self.unstarted)
        try:
            out, err = self.proc.communicate(self.stdin, timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            self.proc.kill()
            self.proc.communicate()
            raise Failure(
                f"{self.args[0]} did not answer within {self.timeout_s:g}s: is slurmctld up?"
            ) from exc
        return subprocess.CompletedProcess(self.args, self.proc.returncode, out, err)


def start(
    args: list[str],
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> Started:
    pipe = subprocess.PIPE
    try:
        proc = subprocess.Popen(
            args, stdin=pipe if stdin is not None else None, stdout=pipe, stderr=pipe, text=True, env=env
        )
    except FileNotFoundError:
        return Started(args, None, unstarted=f"{args[0]} not found: is this a SLURM login node?")
    except OSError as exc:  # found but not runnable (permissions, a broken interpreter line...)
        return Started(args, None, unstarted=f"{args[0]} cannot be run: {exc.strerror or exc}")
    wait = TIMEOUT_S if timeout_s is None else timeout_s
    return Started(args, proc, stdin, time.monotonic() + wait, wait)


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return start(args, stdin).wait()


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines
    return " ".join(" ".join(errors[:2]).split())


# ------------------------------------------------------------------------------------- parameters
def default_cpus(spec: RunSpec) -> int:
    """CPUs a node task needs: one per rank and one per DataLoader worker of each rank."""
    return max(1, spec.resources.gpus_per_node) * (spec.data.num_workers + 1)


def cpus_per_task(spec: RunSpec, node_cpus: int | None = None) -> int:
    """``resources.cpus_per_task``, else :func:`default_cpus` capped at the CPUs a node has (when known).

    Without a request SLURM gives one CPU per task: under cgroups every rank and worker of a node would
    share one core, and a whole-node job could not preempt this one as expected.
    """
    if spec.resources.cpus_per_task:
        return spec.resources.cpus_per_task
    wanted = default_cpus(spec)
    return min(wanted, node_cpus) if node_cpus else wanted


def node_cpus(spec: RunSpec) -> int | None:
    """The fewest CPUs of a node in the run's partition(s) (sinfo), None when sinfo cannot tell."""
    try:
        proc = _run(["sinfo", "-h", "-N", "-o", "%N|%P|%c"])
    except Failure:
        return None
    names = set((spec.resources.partition or "").split(",")) - {""}
    counts = []
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3 and fields[2].isdigit():
            part = fields[1]
            if (part.rstrip("*") in names) if names else part.endswith("*"):
                counts.append(int(fields[2]))
    return min(counts) if proc.returncode == 0 and counts else None


def executor_parameters(
    spec: RunSpec, node_cpus: int | None = None, exclude: list[str] | None = None
) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per node, requeue on preemption, the spec's signal,
    CPUs for every rank and DataLoader worker (:func:`cpus_per_task`), and the nodes the run leaves out
    (:mod:`cluster.nodes`) added to the spec's own ``--exclude``."""
    res = spec.resources
    cpus = cpus_per_task(spec, node_cpus)
    extra: dict[str, Any] = {k: (True if v == "" else v) for k, v in res.extra_sbatch.items()}
    params: dict[str, Any] = {
        "job_name": spec.name,
        "time": res.time_limit_min,
        "nodes": res.nodes,
        "ntasks_per_node": 1,
        "signal_delay_s": res.signal_lead_s,
        "stderr_to_stdout": True,
        "cpus_per_task": cpus,
        # srun no longer inherits the job's --cpus-per-task (SLURM 22.05+): the step would get one CPU.
        # -K: a node task that fails ends the step, instead of the others holding the allocation through
        # torch's 600 s rendezvous join timeout; every other way a node task ends exits 0 (submitit's
        # requeue exits 255, but only after the launcher of node 0 is past the ranks' last barrier).
        "srun_args": [f"--cpus-per-task={cpus}", "--kill-on-bad-exit=1"],
        # The job itself reads SUBMITIT_PREEMPT_SIGNAL to know which signal means "checkpoint now".
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={res.signal}"],
        "additional_parameters": {"requeue": True, "signal": f"{res.signal}@{res.signal_lead_s}", **extra},
    }
    if exclude:
        own = [n for n in str(extra.get("exclude", "")).split(",") if n]
        params["additional_parameters"]["exclude"] = ",".join(dict.fromkeys([*own, *exclude]))
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem"] = f"{res.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    return params


def submitit_command(folder: Path, python: str | None = None) -> str:
    return " ".join(
        [python or shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))]
    )


def render_script(params: dict[str, Any], folder: Path, python: str | None = None) -> str:
    """The exact sbatch script submitit writes for these parameters (for --dry-run and the record)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submitit_command(folder, python), folder=folder, **params)


# ------------------------------------------------------------------------------------- preflight
@dataclass
class Partition:
    name: str
    default: bool = False
    up: bool = True
    nodes: dict[str, int] = field(default_factory=dict)  # node -> GPUs (gres/gpu count)
    cpus: dict[str, int] = field(default_factory=dict)  # node -> CPUs, where sinfo said
    mem_mb: dict[str, int] = field(default_factory=dict)  # node -> memory (MB), where sinfo said


def gpu_count(gres: str) -> int:
    """GPUs in a sinfo %G string: ``gpu:2``, ``gpu:a100:4(S:0-1)``, ``gpu:2,nvme:1``, ``(null)``."""
    total = 0
    for item in gres.split(","):
        item = item.split("(")[0].strip()
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_sinfo(text: str) -> dict[str, Partition]:
    """``sinfo -h -N -o '%N|%P|%G|%a|%c|%m'`` (one line per node and partition; CPUs and memory
    optional)."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 4:
            continue
        node, pname, gres, avail = fields[:4]
        default = pname.endswith("*")
        pname = pname.rstrip("*")
        p = parts.setdefault(pname, Partition(pname))
        p.default = p.default or default
        p.up = avail.strip().lower() == "up"
        p.nodes[node] = max(p.nodes.get(node, 0), gpu_count(gres))
        for known, value in zip((p.cpus, p.mem_mb), fields[4:6], strict=False):
            if value.strip().isdecimal():
                known[node] = int(value)
    return parts


def check_partitions(
    spec: RunSpec, partitions: dict[str, Partition], exclude: list[str] | None = None
) -> None:
    """Refuse (exit 2) what the cluster can never run, before anything is written or queued; nodes the
    run leaves out do not count."""
    res = spec.resources
    left_out = set(exclude or ())
    if not partitions:
        raise Failure(
            "sinfo lists no partitions: is slurmctld up? (cluster/slurm/setup.sh starts a local one)"
        )
    if res.partition:
        names = [n for n in res.partition.split(",") if n]
        unknown = [n for n in names if n not in partitions]
        if unknown:
            raise UsageError(
                f"resources.partition: no partition {unknown[0]!r} on this cluster "
                f"(available: {', '.join(sorted(partitions))})"
            )
    else:
        names = [p.name for p in partitions.values() if p.default]
        if not names:
            raise UsageError("resources.partition: this cluster has no default partition; name one")
    problems = []
    for name in names:
        p = partitions[name]
        fit = [n for n, g in p.nodes.items() if g >= res.gpus_per_node and n not in left_out]
        if len(fit) >= res.nodes:
            roomy = [n for n in fit if _room(p, n, res.cpus_per_task, res.mem_gb)]
            if len(roomy) >= res.nodes:
                return
            problems.append(_too_small(p, res.nodes, res.cpus_per_task, res.mem_gb))
            continue
        most = max(p.nodes.values(), default=0)
        if res.gpus_per_node and most == 0:
            problems.append(f"--gpus {res.gpus_per_node}: partition {name!r} has no GPUs (no gres/gpu)")
        elif res.gpus_per_node > most:
            problems.append(
                f"--gpus {res.gpus_per_node}: partition {name!r} has at most {most} GPUs per node"
            )
        else:
            gpus = f" with {res.gpus_per_node} GPUs" if res.gpus_per_node else ""
            out = ", ".join(n for n in sorted(left_out) if n in p.nodes)
            why = (
                f" without {out}, left out after failing this run (pixpro resume --include-node NODE)"
                if out
                else ""
            )
            problems.append(f"--nodes {res.nodes}: partition {name!r} has only {len(fit)} node(s){gpus}{why}")
    raise UsageError(problems[0])


def _room(p: Partition, node: str, cpus: int | None, mem_gb: float | None) -> bool:
    """Whether ``node`` has the CPUs and memory a task asks for (what sinfo did not say counts as room)."""
    enough_cpus = not cpus or p.cpus.get(node, cpus) >= cpus
    return enough_cpus and (not mem_gb or p.mem_mb.get(node, 1 << 62) >= mem_gb * 1024)


def _too_small(p: Partition, nodes: int, cpus: int | None, mem_gb: float | None) -> str:
    asked = [f"resources.cpus_per_task {cpus}" if cpus and max(p.cpus.values(), default=cpus) < cpus else ""]
    most_mem = round(max(p.mem_mb.values(), default=0) / 1024, 1)
    asked.append(f"resources.mem_gb {mem_gb:g}" if mem_gb and p.mem_mb and most_mem < mem_gb else "")
    has = f"at most {max(p.cpus.values(), default=0)} CPUs and {most_mem:g} GB per node"
    wanted = " and ".join(a for a in asked if a) or f"cpus_per_task and mem_gb on {nodes} node(s)"
    return f"{wanted}: partition {p.name!r} has {has}"


def sbatch_error(stderr: str, spec: RunSpec) -> UsageError | Failure:
    """sbatch's refusal as one actionable line."""
    res = spec.resources
    low = stderr.lower()
    if "invalid generic resource" in low or "invalid gres" in low:
        return UsageError(
            f"--gpus {res.gpus_per_node}: the cluster has no such GPUs (sbatch: Invalid generic resource)"
        )
    if "invalid partition" in low:
        return UsageError(f"resources.partition: invalid partition {res.partition!r} (sbatch refused it)")
    if "node configuration is not available" in low:
        return UsageError(
            f"{res.nodes} node(s) x {res.gpus_per_node} GPUs is more than partition "
            f"{res.partition or '(default)'} can ever give "
            "(sbatch: Requested node configuration is not available)"
        )
    if "invalid account" in low or "invalid qos" in low or "time limit" in low or "invalid" in low:
        return UsageError(f"sbatch refused the job: {_one_line(stderr)}")
    return Failure(f"sbatch failed: {_one_line(stderr) or 'no message'}")


def preflight(spec: RunSpec, script: str, exclude: list[str] | None = None) -> str:
    """sinfo checks, then ``sbatch --test-only`` of the real script; returns sbatch's start estimate."""
    info = _run(["sinfo", "-h", "-N", "-o", "%N|%P|%G|%a|%c|%m"])
    if info.returncode != 0:
        hint = "is slurmctld up? --executor local runs it on this machine"  # a laptop with SLURM's client
        room = MAX_LINE - len(f"pixpro: sinfo failed:  ({hint})")  # sinfo's words are cut, not the hint
        raise Failure(f"sinfo failed: {one_line(_one_line(info.stderr), room)} ({hint})")
    check_partitions(spec, parse_sinfo(info.stdout), exclude)
    test = _run(["sbatch", "--test-only"], stdin=script)
    if test.returncode != 0:
        raise sbatch_error(test.stderr + test.stdout, spec)
    return _one_line(test.stderr + test.stdout)


@dataclass(frozen=True)
class KillTimes:
    """When SLURM kills a job after its signal: a preempted one GraceTime + KillWait after its first
    signal (SIGTERM, or the user signal with ``preempt_send_user_signal``) whatever its ``--signal``
    lead (slurm.schedmd.com/preempt.html); one at its time limit KillWait after its end time."""

    grace_s: int
    """The GraceTime of what preempts: the partition's (``preempt/partition_prio``), or the job's QOS's
    (``preempt/qos``, from ``sacctmgr``)."""
    kill_wait_s: int
    preemptible: bool
    """The job can be preempted (a PreemptType, the partition's PreemptMode not OFF) and that GraceTime
    is known: only then does a preemption's window bound its budgets."""
    ends_at: float | None
    """The job's EndTime (epoch seconds), None where it has none (no time limit) or is not known."""
    user_signal_first: bool = False
    """``SlurmctldParameters=preempt_send_user_signal``: a preemption starts with the user signal, so a
    SIGTERM is never one's first signal."""

    @property
    def window_s(self) -> int:
        return self.grace_s + self.kill_wait_s

    @property
    def term_window_s(self) -> int:
        """From a SIGTERM to the SIGKILL: KillWait after ``scancel``, ``scontrol requeue`` or the time
        limit's end; a preemption's window where a preemption starts with SIGTERM (the shorter one
        cannot be told apart there, and a preemption is the signal a checkpoint is for)."""
        return self.window_s if self.preemptible and not self.user_signal_first else self.kill_wait_s


def kill_times(partition: str | None, job_id: str | None, timeout_s: float = 10.0) -> KillTimes | None:
    """What ``scontrol`` says of the cluster's KillWait, ``partition`` and job ``job_id`` (three questions
    asked side by side, each given ``timeout_s``); None where it does not say KillWait."""
    env = {**os.environ, "SLURM_TIME_FORMAT": "standard"}  # whatever the user's own setting: ISO times
    asked = [
        start(["scontrol", "show", "config"], env=env),
        start(["scontrol", "-o", "show", "partition", partition], env=env) if partition else None,
        start(["scontrol", "-o", "show", "job", job_id], env=env) if job_id else None,
    ]
    deadline = time.monotonic() + timeout_s
    texts: list[str] = []
    try:
        for started in asked:
            if started is not None:
                started.deadline = deadline
                texts.append(started.wait().stdout)
            else:
                texts.append("")
    except Failure:
        return None
    finally:
        for started in asked:  # one that failed leaves the others unasked: never left running
            if started is not None and started.proc is not None and started.proc.poll() is None:
                started.proc.kill()
                started.proc.communicate()
    config, part, jobs = texts
    # an array's last task shares its number with the array: every task's record is listed, one a line
    job = next((line for line in jobs.splitlines() if line.startswith(f"JobId={job_id} ")), "")
    kill = re.search(r"^KillWait\s*=\s*(\d+) sec", config, re.M)
    if kill is None:
        return None
    kind = re.search(r"^PreemptType\s*=\s*preempt/(\S+)", config, re.M)
    mode = re.search(r"\bPreemptMode=(\S+)", part)
    end = re.search(r"\bEndTime=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\b", job)
    user_first = re.search(r"^SlurmctldParameters\s*=.*\bpreempt_send_user_signal\b", config, re.M)
    grace: int | None = None
    if kind is not None and kind[1] == "qos":
        qos = re.search(r"\bQOS=(\S+)", job)
        grace = _qos_grace(qos[1], deadline) if qos else None
    elif kind is not None and kind[1] != "none":
        found = re.search(r"\bGraceTime=(\d+)\b", part)
        grace = int(found[1]) if found else 0
    return KillTimes(
        grace_s=grace or 0,
        kill_wait_s=int(kill[1]),
        preemptible=grace is not None and (mode is None or mode[1].upper() != "OFF"),
        ends_at=datetime.datetime.strptime(end[1], "%Y-%m-%dT%H:%M:%S").timestamp() if end else None,
        user_signal_first=user_first is not None,
    )


def _qos_grace(qos: str, deadline: float) -> int | None:
    """The QOS's GraceTime in seconds (``[D-]HH:MM:SS`` from ``sacctmgr``), None where it does not say."""
    started = start(["sacctmgr", "-n", "-P", "show", "qos", qos, "format=GraceTime"])
    started.deadline = deadline
    try:
        text = started.wait().stdout.strip()
    except Failure:
        return None
    found = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if found is None:
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in found.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


# ------------------------------------------------------------------------------------- submit
def submit(task: Any, params: dict[str, Any], folder: Path, spec: RunSpec) -> str:
    """sbatch through submitit (it pickles ``task`` beside the script); returns the job id."""
    from submitit import SlurmExecutor

    executor = SlurmExecutor(folder=folder, max_num_timeout=MAX_TIME_LIMITS)
    executor.update_parameters(**params)
    with _sbatch_stderr() as said:
        try:
            job = executor.submit(task)
        except Exception as exc:
            raise sbatch_error(str(exc) or said(), spec) from None
    return str(job.job_id)


@contextlib.contextmanager
def _sbatch_stderr() -> Iterator[Callable[[], str]]:
    """What submitit prints of sbatch's refusal (it puts the same text in its error, which makes the one
    line) and sbatch's own stderr: caught, never shown raw; the caught text where the error has none."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught, open(caught.fileno(), "w", closefd=False) as text:

        def said() -> str:
            text.flush()
            caught.seek(0)
            return caught.read().decode(errors="replace")

        os.dup2(caught.fileno(), 2)  # sbatch's own
        try:
            with contextlib.redirect_stderr(text):  # submitit's print, whatever sys.stderr was
                yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def submit_array(
    tasks: list[Any], params: dict[str, Any], folder: Path, spec: RunSpec, max_parallel: int | None
) -> list[str]:
    """One sbatch of a job array through submitit (one pickle per task); returns the task ids in order
    (``<array>_<index>``, the ids squeue, sacct and scontrol accept)."""
    from submitit import SlurmExecutor

    executor = SlurmExecutor(folder=folder, max_num_timeout=MAX_TIME_LIMITS)
    executor.update_parameters(**params, array_parallelism=max_parallel or len(tasks))
    with _sbatch_stderr() as said:
        try:
            with executor.batch():
                jobs = [executor.submit(task) for task in tasks]
        except Exception as exc:
            raise sbatch_error(str(exc) or said(), spec) from None
    return [str(job.job_id) for job in jobs]


def scancel(job_ids: list[str]) -> None:
    if not job_ids:
        return
    proc = _run(["scancel", *job_ids])
    if proc.returncode != 0:
        raise Failure(f"scancel failed: {_one_line(proc.stderr)}")


def accounting_state(job_id: str) -> str | None:
    """The job's state as the accounting has it now (``sacct -X``): ``CANCELLED`` from the moment of a
    ``scancel``, while scontrol still says COMPLETING. None where it does not answer or has no run of
    the job (a jobcomp-only cluster records a job only when it ends)."""
    try:
        proc = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    except Failure:
        return None
    states = [line.split()[0].upper() for line in proc.stdout.splitlines() if line.strip()]
    return states[-1] if proc.returncode == 0 and states else None


def set_dependency(job_id: str, dependency: str) -> None:
    """A pending job waits on another job from now on (``scontrol update``; SLURM refuses it once the
    job started)."""
    proc = _run(["scontrol", "update", f"JobId={job_id}", f"Dependency={dependency}"])
    if proc.returncode != 0:
        why = _one_line(proc.stderr)
        raise Failure(f"scontrol update JobId={job_id} Dependency={dependency} failed: {why}")


# ------------------------------------------------------------------------------------- queries
SQUEUE_ARGS = ("-h", "--states=all", "-o", "%i|%T|%r|%S", "-j")  # %S: a pending job's expected start
# -D: every run of a requeued job (slurmdbd; jobcomp logs one line per run anyway); -X: no steps.
SACCT_ARGS = ("-D", "-X", "-P", "-n", "-o", "JobID,State,ExitCode,Start,End", "-j")


@dataclass
class HistoryLine:
    """One sacct record of the job: a run (each requeue adds one), or the run not yet ended."""

    state: str
    exit_code: int
    signal: int
    start: float | None
    end: float | None


@dataclass
class SlurmJob:
    job_id: str
    queue_state: str | None = None  # squeue %T while slurmctld still knows the job
    reason: str = ""
    history: list[HistoryLine] = field(default_factory=list)  # ended runs, oldest first
    current: HistoryLine | None = None  # slurmdbd's record of the run not ended yet (PENDING/RUNNING)
    unanswered: tuple[str, ...] = ()  # the commands that failed when asked about it ("squeue", "sacct")
    expected_start: float | None = None  # squeue's expected start of a pending job, when SLURM has one


def _time(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None  # "Unknown", "None": not started / not ended


def _exit(text: str) -> tuple[int, int]:
    code, _, sig = text.partition(":")
    try:
        return int(code or 0), int(sig or 0)
    except ValueError:
        return 0, 0


def array_ids(jid: str) -> list[str]:
    """The task ids of a line about array tasks not started yet (``123_[0-3,5%2]`` -> ``123_0`` ...
    ``123_5``); any other id as it is."""
    main, sep, rest = jid.partition("_[")
    if not sep or not rest.endswith("]"):
        return [jid]
    out = []
    for part in rest[:-1].split("%")[0].split(","):
        first, _, last = part.partition("-")
        if not (first.isdigit() and (last or first).isdigit()):
            return [jid]
        out += [f"{main}_{i}" for i in range(int(first), int(last or first) + 1)]
    return out


def parse_squeue(text: str, jobs: dict[str, SlurmJob]) -> None:
    """``squeue -h --states=all -o '%i|%T|%r|%S'`` into ``queue_state``, ``reason`` and, for a pending
    job, ``expected_start`` (what ``squeue --start`` shows; "N/A" until the scheduler has planned it).
    Array tasks not started yet share one line."""
    for line in text.splitlines():
        jid, _, rest = line.strip().partition("|")
        state, _, rest = rest.partition("|")
        reason, _, start = rest.partition("|")
        for one in array_ids(jid):
            if one in jobs:
                jobs[one].queue_state = state.strip()
                jobs[one].reason = "" if reason.strip() in ("None", "(null)") else reason.strip()
                if state.strip().upper() == "PENDING":
                    jobs[one].expected_start = _time(start)


def parse_sacct(text: str, jobs: dict[str, SlurmJob], submitted: dict[str, float] | None = None) -> None:
    """``sacct -D -X -P -n -o JobID,State,ExitCode,Start,End`` into ``history`` and ``current``.

    Both kinds of job history read alike. slurmdbd (-D): one record per run -- REQUEUED, PREEMPTED,
    NODE_FAIL for runs that were requeued, then the record of the current run, which has no End
    while it is PENDING or RUNNING (and lags: it may still say PENDING for a run that started).
    jobcomp/filetxt (``--completion``): one line per ended run; a requeued run is logged as PENDING
    (with its End), so an ended PENDING record is a requeued run. Records are not grouped by job.
    History records that ended before our submission belong to an older job with a reused id
    (slurmctld restarted without its state) and are dropped.
    """
    for line in text.splitlines():
        fields = line.strip().split("|")
        for one in array_ids(fields[0]) if len(fields) >= 5 else []:
            if one in jobs:  # not job steps (123.batch) nor unrelated lines
                _add_history(jobs[one], fields, submitted)
    for job in jobs.values():
        job.history.sort(key=lambda r: r.end or 0.0)  # stable: sacct's order among equal ends


def _add_history(job: SlurmJob, fields: list[str], submitted: dict[str, float] | None) -> None:
    """One sacct record of the job: its current run, or an ended one (those of an older job with a reused
    id dropped)."""
    code, sig = _exit(fields[2])
    state = fields[1].split()[0] if fields[1].strip() else "UNKNOWN"  # "CANCELLED by 0"
    rec = HistoryLine(state, code, sig, _time(fields[3]), _time(fields[4]))
    if rec.end is None:
        job.current = rec
        return
    since = (submitted or {}).get(job.job_id)
    if since is not None and rec.end < since - 5:
        return
    if state in ("PENDING", "REQUEUE_FED", "REQUEUE_HOLD", "REQUEUED"):
        rec.state = "REQUEUED"  # an ended run that was requeued (jobcomp logs it as PENDING)
    job.history.append(rec)


def _answer(started: Started) -> subprocess.CompletedProcess[str]:
    """A status query's answer: a command that is missing or silent is a failed answer (the runs are
    listed, their SLURM state UNKNOWN), not a failed ``pixpro status``."""
    try:
        return started.wait()
    except Failure as exc:
        return subprocess.CompletedProcess(started.args, 1, "", str(exc))


def query(
    job_ids: list[str], submitted: dict[str, float] | None = None, timeout_s: float | None = None
) -> tuple[dict[str, SlurmJob], list[str]]:
    """States of many jobs with one squeue and one sacct call, run side by side, each given ``timeout_s``
    (:data:`TIMEOUT_S` unless set); also returns warnings (one line each)."""
    jobs = {j: SlurmJob(j) for j in job_ids}
    warnings: list[str] = []
    if not jobs:
        return jobs, warnings
    ids = ",".join(jobs)
    asked = (
        start(["squeue", *SQUEUE_ARGS, ids], timeout_s=timeout_s),
        start(["sacct", *SACCT_ARGS, ids], timeout_s=timeout_s),
    )
    q, a = (_answer(s) for s in asked)
    failed: list[str] = []
    if q.returncode == 0:
        parse_squeue(q.stdout, jobs)
    elif "invalid job id" not in q.stderr.lower():  # with it, slurmctld did answer: it forgot the jobs
        warnings.append(f"squeue failed: {_one_line(q.stderr)}")
        failed.append("squeue")
    if a.returncode == 0:
        parse_sacct(a.stdout, jobs, submitted)
    else:
        warnings.append(f"sacct failed: {_one_line(a.stderr)}")
        failed.append("sacct")
    for job in jobs.values():
        job.unanswered = tuple(failed)
    return jobs, warnings
