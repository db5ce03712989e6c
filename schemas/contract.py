"""The contract between the login node (``cluster``) and the compute nodes (``launch``), defined once.

What one side writes and the other reads: the run folder's and the checkpoint store's file names, the
trainer's ``status.json`` and metrics records, the exit statuses every process of the tree uses, and the
preemption deadlines both sides budget from ``resources.signal_lead_s``. Torch-free and import-light:
``pixpro status`` reads through it.

Run folder (``runs/<run_id>/`` on the login node, shared with the compute nodes)::

    spec.json       the resolved spec the trainers load        run.json   the run record (also in the store)
    sbatch.sh       the script submitit queued                 CANCELLED  present while a cancel stands
    submitit/       submitit's pickles and per-node logs       local/     local executor's job records/logs
    logs/<attempt>[.r<round>]/rank<R>/   each global rank's stdout/stderr (torchrun)
    tensorboard/    rank 0's TensorBoard event files, one file per attempt (``tensorboard --logdir``)
    checkpoints/    the checkpoint store, unless checkpoint.url points elsewhere
    heartbeats/<node>.json   each node agent's view of its ranks' progress (hang watchdog, status)
    node_failures/  one NodeFailure per rank failure blamed on its node (``sbatch --exclude`` after two)
    evals/<eval_id>/   an evaluation run as a job (``pixpro eval --submit``): request, result, its logs

:class:`RunPaths` spells each of them from the run folder; every path either side uses comes from it.

Checkpoint store (any fsspec URL; format and commit protocol in :mod:`launch.store`)::

    step-<012d step>.<attempt>/{train.pt, rank<R>.pt, manifest.json}   one checkpoint, manifest last
    latest          pointer to the newest committed checkpoint, moved by compare-and-swap
    status.json     TrainerStatus       metrics/<attempt>.<chunk>.jsonl   MetricsRecord lines
    run.json        the run record
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import signal

    from schemas.records import EvalRequest as EvalRequest
    from schemas.records import EvalResult as EvalResult
    from schemas.records import MetricsRecord as MetricsRecord
    from schemas.records import NodeFailure as NodeFailure
    from schemas.records import NodeHeartbeat as NodeHeartbeat
    from schemas.records import RankBeat as RankBeat
    from schemas.records import TrainerStatus as TrainerStatus

# -- run folder --------------------------------------------------------------------------------------
SPEC_FILE = "spec.json"
RECORD_FILE = "run.json"
SBATCH_FILE = "sbatch.sh"
CANCEL_MARKER = "CANCELLED"
"""Present in the run folder while the user's cancel stands: a job that sees it does not requeue itself."""
SUBMITIT_DIR = "submitit"
LOGS_DIR = "logs"
CHECKPOINTS_DIR = "checkpoints"
NODE_FAILURES_DIR = "node_failures"
"""In the run folder: one :class:`NodeFailure` file per rank that failed through no fault of the run
(killed, crashed, hung, a CUDA error), written by that node's agent (:mod:`launch.node_failures`)."""
TENSORBOARD_DIR = "tensorboard"
"""Rank 0's TensorBoard event files; each attempt's file starts with a purge at its first new step, so
steps a resumed attempt repeats replace the earlier attempt's (``tensorboard --logdir`` reads it)."""
LOCAL_DIR = "local"
EVALS_DIR = "evals"
"""In the run folder: one :class:`EvalPaths` folder per evaluation submitted as a job."""
HEARTBEATS_DIR = "heartbeats"
"""In the run folder: ``heartbeats/<node>.json`` (:class:`NodeHeartbeat`), rewritten every few seconds
by each node's agent (:mod:`launch.watchdog`) from its ranks' heartbeats; ``pixpro status`` reads it."""


class RunPaths:
    """Every path of one run folder, from the folder alone (submitit's ``JobPaths`` is the model)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def __repr__(self) -> str:
        return f"RunPaths({str(self.run_dir)!r})"

    @property
    def spec(self) -> Path:
        """The resolved spec every attempt's trainers load."""
        return self.run_dir / SPEC_FILE

    @property
    def record(self) -> Path:
        return self.run_dir / RECORD_FILE

    @property
    def sbatch(self) -> Path:
        """The sbatch script as rendered at submission (for the user to read; submitit writes its own)."""
        return self.run_dir / SBATCH_FILE

    @property
    def cancel_marker(self) -> Path:
        return self.run_dir / CANCEL_MARKER

    @property
    def submitit(self) -> Path:
        """submitit's folder: pickled node tasks, ``<job>_<node>_log.out`` per node."""
        return self.run_dir / SUBMITIT_DIR

    @property
    def local(self) -> Path:
        """The local executor's ``<job>.json`` (pid, exit status) and ``<job>.log`` per attempt."""
        return self.run_dir / LOCAL_DIR

    @property
    def logs(self) -> Path:
        """torchrun's ``--log-dir``: ``<attempt>[.r<round>]/rank<R>/`` per global rank."""
        return self.run_dir / LOGS_DIR

    @property
    def checkpoints(self) -> Path:
        """The default checkpoint store (``checkpoint.url`` unset)."""
        return self.run_dir / CHECKPOINTS_DIR

    def store_url(self, url: str | None) -> str:
        """The run's checkpoint store: ``checkpoint.url``, else :attr:`checkpoints`."""
        return url or str(self.checkpoints)

    @property
    def tensorboard(self) -> Path:
        return self.run_dir / TENSORBOARD_DIR

    @property
    def heartbeats(self) -> Path:
        return self.run_dir / HEARTBEATS_DIR

    def heartbeat(self, node: str) -> Path:
        return self.heartbeats / f"{node}.json"

    @property
    def node_failures(self) -> Path:
        """One :class:`NodeFailure` file per rank failure blamed on its node."""
        return self.run_dir / NODE_FAILURES_DIR

    @property
    def evals(self) -> Path:
        return self.run_dir / EVALS_DIR

    @property
    def start_lock(self) -> Path:
        """Held while an attempt of the run is chosen and queued or cancelled (a resume, a cancel, a sweep
        member's first attempt): two pixpro processes never act on a run at once."""
        return self.run_dir / ".start.lock"

    def eval(self, eval_id: str) -> EvalPaths:
        return EvalPaths(self.evals / eval_id)


LATEST_ATTEMPT = "latest"
"""``EvalRequest.after`` of an evaluation that waits for whichever attempt of its run is the latest (a
local sweep member's, queued before the sweep runner started it: it has no job to name yet)."""


class EvalPaths:
    """One evaluation job's folder: the login node writes the request, the job its result."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def eval_id(self) -> str:
        return self.folder.name

    @property
    def request(self) -> Path:
        """:class:`EvalRequest`, written by ``pixpro eval --submit`` (and again with the job id)."""
        return self.folder / "request.json"

    @property
    def result(self) -> Path:
        """:class:`EvalResult`, written by the job when it starts and when it ends."""
        return self.folder / "result.json"

    @property
    def cancel_marker(self) -> Path:
        """Written by ``pixpro cancel`` of the evaluation's job (a local job's state reads it)."""
        return self.folder / CANCEL_MARKER

    @property
    def log(self) -> Path:
        """The local executor's log of the job (SLURM's are in :attr:`submitit`)."""
        return self.folder / "eval.log"

    @property
    def submitit(self) -> Path:
        return self.folder / SUBMITIT_DIR


class NotRegularFile(OSError):
    """``atomic_write``'s refusal of a target that exists and is not a regular file (a FIFO, a device,
    a folder, a socket, a dangling symbolic link): its ``strerror`` says which, in words."""


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def atomic_write_target(path: Path) -> Path:
    """The file :func:`atomic_write` writes for ``path``: ``path`` itself, or the regular file a symbolic
    link at ``path`` leads to (the link stays). Raises :class:`NotRegularFile` for anything else that
    exists there: renaming over it would replace a device, FIFO or link with a file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise NotRegularFile(0, "is a symbolic link to nothing", str(path)) from None
        return path
    if stat.S_ISREG(info.st_mode):
        return Path(os.path.realpath(path)) if os.path.islink(path) else path
    kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")
    raise NotRegularFile(0, f"exists and is {kind}, not a regular file", str(path))


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False, mode: int | None = None) -> None:
    """Write via a temporary file and rename: a reader on either side never sees half a file.

    A symbolic link to a regular file is followed (its target is replaced, the link stays); anything else
    that exists and is not a regular file is refused (:class:`NotRegularFile`), never replaced.
    ``exclusive``: never replace an existing file (``FileExistsError``; a hard link is atomic).
    ``mode``: the new file's permissions less the umask (as ``open`` makes them), else 0600."""
    import tempfile  # here: ``validate`` writes nothing (~0.003 s of its start-up)

    target = atomic_write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        if mode is not None:
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(fd, mode & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if exclusive:
            os.link(tmp, target)  # FileExistsError when someone created it meanwhile
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def wandb_run_id(run_id: str) -> str:
    """The W&B run id of a pixpro run (``logging.wandb``): the same for every attempt, so each resumes
    the one W&B run, and W&B-safe whatever characters the run id holds."""
    return "pixpro-" + hashlib.sha256(run_id.encode()).hexdigest()[:16]


# -- checkpoint store --------------------------------------------------------------------------------
LATEST = "latest"
MANIFEST = "manifest.json"
STATUS_FILE = "status.json"
METRICS_DIR = "metrics"
TRAIN_FILE = "train.pt"
CLAIMS_DIR = "claims"
"""``claims/<attempt>.json``: the generation each attempt claimed (``CheckpointStore.claim``)."""
AUX_TOP = frozenset({METRICS_DIR, STATUS_FILE, RECORD_FILE, CLAIMS_DIR, "aux"})
"""Top-level store objects beside the checkpoints: never part of one, never pruned, never foreign."""


def rank_file(rank: int) -> str:
    """Each rank's own file of a checkpoint (its RNG streams)."""
    return f"rank{rank}.pt"


# -- error lines -------------------------------------------------------------------------------------
MAX_LINE = 200
"""Longest error line any command prints: an echoed key, value, path or cause is cut, never a screenful."""


def one_line(text: object, limit: int = MAX_LINE) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- exit statuses -----------------------------------------------------------------------------------
class Exit(IntEnum):
    """Exit statuses of the CLI and of every process between ``sbatch`` and a trainer rank."""

    OK = 0
    FAILURE = 1
    USAGE = 2  # bad options or spec: nothing written, nothing queued
    NOT_FOUND = 3  # no such run, job or checkpoint
    PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was committed, resume me
    INTERRUPTED = 130  # Ctrl-C on the CLI


# -- records the trainer writes beside its checkpoints -----------------------------------------------
TrainerState = Literal["running", "completed", "preempted", "diverged"]


# -- evaluations run as jobs (``pixpro eval --submit``) -----------------------------------------------
EvalTask = Literal["dense", "linear", "knn"]
EvalState = Literal["running", "completed", "failed"]
EVAL_HEADLINE = {"dense": ("miou", "pixel_accuracy"), "linear": ("top1", "top5"), "knn": ("top1", "top5")}
"""The numbers of an evaluation's result that ``pixpro status`` shows, per task."""

# -- what ``pixpro export`` writes ------------------------------------------------------------------
EXPORT_FORMATS = ("torchvision", "detectron2")
"""``pixpro export --format``."""


def export_refusal(fmt: str, output: Path, force: bool) -> str | None:
    """Why ``pixpro export`` cannot write ``output`` in ``fmt``, or None: asked by the CLI at once and by
    the export tool, which imports torch first (its write is create-only besides)."""
    if fmt not in EXPORT_FORMATS:
        return f"unknown format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}"
    return output_refusal(output, force)


def output_refusal(output: Path, force: bool) -> str | None:
    """Why a tool (export, plot, viz) cannot write its ``-o`` file, or None: a folder, or a file that
    exists and ``--force`` was not given (nothing already written is overwritten by a typo)."""
    if output.is_dir():
        return f"output {output} is a folder; give a file name"
    if output.exists() and not force:
        return f"output {output} already exists; pass --force to overwrite it"
    if not output.absolute().parent.is_dir():  # a typo in a path is not a folder to create
        return f"output {output}: its folder does not exist"
    return None


# -- environment variables that cross a process boundary ---------------------------------------------
HOME_ENV = "PIXPRO_HOME"
"""The login node's state folder (runs, index); read by the CLI, set by the tests and benches."""
DEBUG_ENV = "PIXPRO_DEBUG"
"""Set (to anything) for tracebacks instead of one-line errors."""
S3_ENDPOINT_ENV = "PIXPRO_S3_ENDPOINT"
"""The S3 endpoint when neither ``storage_options`` nor botocore's own settings name one."""
ATTEMPT_ENV = "PIXPRO_ATTEMPT"
"""Set by the node task for the launcher and its trainers: the attempt id (``<job>.<restart>``)."""
SIGNAL_ENV = "PIXPRO_SIGNAL"
"""Set by the node task for the launcher: the user signal that means checkpoint and stop."""
EXIT_DIR_ENV = "PIXPRO_EXIT_DIR"
"""Set by ``launch.run`` for its trainers: a folder where each rank that stops on purpose leaves a marker
(:func:`exit_marker`), so it can exit 0 (torchrun does not restart it) and the launcher says why."""
ROUND_ENV = "PIXPRO_RDZV_ROUND"
"""Set by the launcher's agent for its workers: the rendezvous round, the same on every node."""


def round_suffix(owner: str, round_: int) -> str:
    """An attempt's name in a rendezvous round: its owner (``<job>.<restart>``, which claims the run),
    and ``.r<round>`` after torchrun restarted its workers (the name of its metrics and rank logs)."""
    return f"{owner}.r{round_}" if round_ else owner


def attempt_owner_of(name: str) -> str:
    """The owner of an attempt :func:`round_suffix` named (the name itself in round 0)."""
    return re.sub(r"\.r\d+$", "", name)


PREEMPT_ENV = "PIXPRO_PREEMPT_PENDING"
"""Set by the launcher once the preemption signal arrived: workers started after it stop at once."""
AGENT_PID_ENV = "PIXPRO_AGENT_PID"
"""Set by the launcher for its workers: a rank dies with its torchrun agent (``PR_SET_PDEATHSIG``), so a
forced stop (SIGKILL, the OOM killer) leaves no rank training on as an orphan."""
HEARTBEAT_DIR_ENV = "PIXPRO_HEARTBEAT_DIR"
"""Set by the launcher's watchdog for its workers: the node-local folder of their heartbeat files."""
STOP_AT_STEP_ENV = "PIXPRO_STOP_AT_STEP"
"""Test hook: the trainer stops (as if preempted) once it reaches this step."""
STEP_PAUSE_ENV = "PIXPRO_STEP_PAUSE_S"
"""Test hook: the trainer sleeps this many seconds after each step, so a tiny run lasts long enough to be
signalled, requeued or cancelled from outside mid-run without burning CPU on a bigger model."""
PREEMPT_WINDOW_ENV = "PIXPRO_PREEMPT_WINDOW_S"
"""Seconds from a preemption's first signal to SLURM's SIGKILL on the job's partition (its GraceTime
plus KillWait, read by the node task from ``scontrol``; unset where the partition is never preempted):
a preemption's budget where it is shorter than ``resources.signal_lead_s``."""
TERM_WINDOW_ENV = "PIXPRO_TERM_WINDOW_S"
"""Seconds from a SIGTERM to SLURM's SIGKILL (KillWait, or a preemption's window where a preemption
starts with SIGTERM; read by the node task from ``scontrol``): a SIGTERM's budget where it is shorter
than ``resources.signal_lead_s``."""
TIME_LIMIT_AT_ENV = "PIXPRO_TIME_LIMIT_AT"
"""The job's end time (epoch seconds; SLURM's EndTime when the attempt started, read by the node task):
a signal that arrives within the lead of it is the time limit's, which the lead bounds, not a
preemption's."""
FORK_ENV = "PIXPRO_FORK"
"""``0``: the launcher and the trainer start ranks and uploaders as fresh interpreters, not by fork from
their own imported state (:mod:`launch.forking`)."""


# -- preemption --------------------------------------------------------------------------------------
def exit_marker(outcome: str, rank: int | str) -> str:
    """The marker file of a rank that stopped on purpose: ``preempted.<rank>``, ``diverged.<rank>`` or
    ``superseded.<rank>`` (``rank="*"`` is the glob of them all)."""
    return f"{outcome}.{rank}"


def user_signal(name: str = "USR2") -> signal.Signals:
    """The run's user signal (``resources.signal``, ``--signal`` on SLURM), ``USR2`` or ``SIGUSR2``."""
    import signal  # here: the login node's commands (validate, status) never need it

    return signal.Signals[f"SIG{name.upper().removeprefix('SIG')}"]


def preemption_signals(name: str = "USR2") -> tuple[signal.Signals, ...]:
    """SIGTERM (plain preemption / requeue) and the user signal: what the launcher and the trainers
    handle, and what whoever starts them holds until they do (``launch.preempt.held``)."""
    import signal

    return tuple(dict.fromkeys([signal.SIGTERM, user_signal(name)]))


def preemption_deadlines(signal_lead_s: float, window_s: float | None = None) -> tuple[float, float]:
    """(commit_s, wait_s) after SLURM's warning signal, both inside the time SLURM leaves before its
    SIGKILL: the lead time before the time limit, or a preemption's window where it is shorter
    (``window_s``: the partition's GraceTime + KillWait, whatever the lead; slurm.schedmd.com/preempt.html).

    The trainers give their final checkpoint ``commit_s`` to land; the node task waits ``wait_s`` for them
    to exit before it asks for the requeue, leaving a margin before SLURM kills the step.
    """
    lead = signal_lead_s if window_s is None else min(signal_lead_s, window_s)
    wait = lead - min(10.0, 0.1 * lead)
    return 0.75 * lead, wait


TIME_LIMIT_SLACK_S = 90.0
"""SLURM sends ``--signal`` up to a minute before the lead it was asked for (its event resolution)."""


def applicable_window(
    window_s: float | None, ends_at: float | None, signal_lead_s: float, signal_at: float
) -> float | None:
    """The preemption window that bounds a signal that arrived at ``signal_at`` (epoch): none for the
    time limit's own signal (within the lead of the job's end), else ``window_s``. A signal well after
    that end is a preemption: the time limit was raised (``scontrol update``) since the end was read."""
    if window_s is None or (
        ends_at is not None
        and -TIME_LIMIT_SLACK_S <= ends_at - signal_at <= signal_lead_s + TIME_LIMIT_SLACK_S
    ):
        return None
    return window_s


def preemption_window(signal_lead_s: float, signal_at: float, sigterm: bool = False) -> float | None:
    """The window that bounds a stop asked at ``signal_at`` (epoch), from what the node task set in this
    process's environment: a SIGTERM's own (:data:`TERM_WINDOW_ENV`), else :func:`applicable_window`."""

    def number(name: str) -> float | None:
        try:
            return float(os.environ[name]) if os.environ.get(name) else None
        except ValueError:
            return None

    if sigterm:
        return number(TERM_WINDOW_ENV)
    return applicable_window(number(PREEMPT_WINDOW_ENV), number(TIME_LIMIT_AT_ENV), signal_lead_s, signal_at)


# -- heartbeats: hang detection ----------------------------------------------------------------------


GONE_AGENT_S = 60.0
"""A node file last written this long before the newest one is a gone agent's (an earlier attempt)."""


def stalled_for(beats: list[NodeHeartbeat], now: float) -> tuple[float, float] | None:
    """``(age_s, limit_s)`` when the run's newest heartbeat is older than its limit, else None.

    The newest rank beat over the live agents' files decides (one live rank is progress). A new
    attempt's agents write their files at once and its ranks beat as they start, so an earlier
    attempt's files never make a starting attempt look stalled."""
    if not beats:
        return None
    newest_file = max(b.updated for b in beats)
    ranks = [r for b in beats if b.updated >= newest_file - GONE_AGENT_S for r in b.ranks]
    if not ranks:
        return None
    newest = max(ranks, key=lambda r: r.time)
    if newest.limit_s is None or now - newest.time <= newest.limit_s:
        return None
    return now - newest.time, newest.limit_s


# -- node failures: leaving out a node that keeps failing --------------------------------------------
EXCLUDE_AFTER = 2
"""A node with this many failures of a run is left out of its next attempts (``sbatch --exclude``)."""
SLURM_NODE_NAME = "SLURMD_NODENAME"
"""SLURM's name of the node a job step runs on (``--exclude`` takes it); the host name elsewhere."""


def node_failure_file(failure: NodeFailure) -> str:
    """Unique per event (attempt, round time, rank): nodes never write the same file."""
    return f"{NODE_FAILURES_DIR}/{failure.node}.{failure.attempt}.rank{failure.rank}.{failure.time:.3f}.json"


def failure_counts(failures: list[NodeFailure], forgotten: dict[str, float]) -> dict[str, int]:
    """Failures per node, leaving out those before the user forgave the node (``--include-node``)."""
    counts: dict[str, int] = {}
    for f in failures:
        if f.time > forgotten.get(f.node, float("-inf")):
            counts[f.node] = counts.get(f.node, 0) + 1
    return counts


def excluded_nodes(counts: dict[str, int]) -> list[str]:
    return sorted(node for node, n in counts.items() if n >= EXCLUDE_AFTER)


# -- the records' models (pydantic), built on first use --------------------------------------------
RECORDS = (
    "TrainerStatus",
    "MetricsRecord",
    "RankBeat",
    "NodeHeartbeat",
    "NodeFailure",
    "EvalRequest",
    "EvalResult",
)
"""Defined in :mod:`schemas.records` and importable from here: importing the contract alone (``pixpro
status``) imports no pydantic."""


def __getattr__(name: str) -> Any:
    if name not in RECORDS:
        raise AttributeError(f"module 'schemas.contract' has no attribute {name!r}")
    import schemas.records

    return getattr(schemas.records, name)
