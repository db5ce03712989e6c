"""``pixpro``: submit PixPro runs to SLURM (or locally) and watch, resume and cancel them.

Every command answers bad input with one line per problem on stderr and a documented exit status
(0 ok, 1 failure, 2 usage or spec error, 3 not found), never a traceback. Heavy modules are imported
inside the commands: ``pixpro status`` must answer in well under a second on a login node.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cluster import errors, hot
from cluster.errors import EXIT_FAILURE, EXIT_USAGE
from cluster.exits import exit_status
from cluster.exits import say as _err
from cluster.hot import check_id as _check_id
from cluster.tools import run_tool, source
from schemas.contract import EXPORT_FORMATS, Exit, atomic_write_target, export_refusal, output_refusal
from schemas.spec.constants import MAX_SEED

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import ClickException, UsageError  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])
EXIT_INTERRUPTED = Exit.INTERRUPTED

SET_HELP = "Override one spec value, validated like the file and recorded in the run (repeatable)."


def guard(fn: F) -> F:
    """Turn every error into one line per problem on stderr and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except (KeyboardInterrupt, Exception) as exc:
            code = exit_status(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


def prose(doc: str | None) -> str:
    """A command's docstring as help: each paragraph one line, for the terminal to wrap. Typer keeps a
    docstring's line breaks (in the command list and after the first paragraph), so a paragraph would
    break where the source wraps; click's ``\\b`` paragraphs keep theirs, and what follows ``\\f`` is
    left out, as click leaves it out."""
    paragraphs = inspect.cleandoc(doc or "").partition("\f")[0].split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def _flags_take_no_value(command: Any) -> None:
    """Leave a flag's type out of help: Typer 0.29 prints ``--json <bool>`` (``--help <bool>`` too),
    which reads as if the flag took a value. A blank metavar is what Typer then prints; a flag's own
    errors name it by its option (``'--json'``), never by its metavar."""
    help_option = command.get_help_option(command.context_class(command))
    for param in [*command.params, help_option]:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _flags_take_no_value(sub)


class _App(typer.Typer):
    """Typer whose own usage errors are one line too (not a multi-line box), for the console script, and
    whose commands' help is their docstring as :func:`prose`."""

    def command(self, name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
        def register(fn: F) -> F:
            kwargs.setdefault("help", prose(fn.__doc__))
            return typer.Typer.command(self, name, **kwargs)(fn)

        return register

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        command = typer.main.get_command(self)
        _flags_take_no_value(command)
        try:
            rv = command.main(args=sys.argv[1:], prog_name="pixpro", standalone_mode=False)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
                print(exc.ctx.get_help())
                sys.exit(EXIT_USAGE)
            _err(" ".join(exc.format_message().split()) + " (see pixpro --help)")
            sys.exit(EXIT_USAGE)
        except ClickException as exc:
            _err(" ".join(exc.format_message().split()))
            sys.exit(exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            _err("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)


app = _App(
    name="pixpro",
    help="PixPro self-supervised pretraining that survives preemption on SLURM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from cluster.runs import pixpro_version

        typer.echo(f"pixpro {pixpro_version()}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Exit status: 0 ok, 1 failure, 2 usage or spec error, 3 run or job not found."""


# ----------------------------------------------------------------------------------------- validate
_SET = typer.Option("--set", metavar="KEY.PATH=VALUE", help=SET_HELP)


@app.command()
@guard
def validate(
    spec: Annotated[Path, typer.Argument(help="Run spec (JSON, or YAML with .yaml/.yml).")],
    sets: Annotated[list[str] | None, _SET] = None,
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="Also run the preflight (model step, data samples, checkpoint probe) in a child process.",
        ),
    ] = False,
) -> None:
    """Check a spec and print it with every default filled in (JSON)."""
    hot.validate(spec, sets, deep)


# ----------------------------------------------------------------------------------------- submit
@app.command()
@guard
def submit(
    spec: Annotated[Path, typer.Argument(help="Run spec (JSON or YAML).")],
    nodes: Annotated[int | None, typer.Option("--nodes", help="Override resources.nodes.")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="Override resources.gpus_per_node.")] = None,
    executor: Annotated[
        str, typer.Option(help="auto (slurm if sbatch is on PATH), slurm or local.")
    ] = "auto",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print spec, sbatch script and torchrun command; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"run_id", "job_id"} only.')] = False,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the log until the attempt ends.")] = False,
    sets: Annotated[list[str] | None, _SET] = None,
    no_preflight: Annotated[
        bool,
        typer.Option("--no-preflight", help="Skip the preflight (model step, data, checkpoint probe)."),
    ] = False,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            metavar="KEY.PATH=V1,V2",
            help="Sweep a spec value (values read as --set reads them); several --sweep make a grid. "
            "Every member is a full run; on SLURM they are queued as one job array.",
        ),
    ] = None,
    max_parallel: Annotated[
        int | None, typer.Option("--max-parallel", help="With --sweep: at most this many members at once.")
    ] = None,
    eval_task: Annotated[
        str | None,
        typer.Option(
            "--eval",
            metavar="TASK",
            help="Also queue an evaluation (knn, linear or dense) of every run, to start when it completed "
            "(as pixpro eval RUN --submit --after).",
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval-data", help="With --eval: its labelled data (default: monitor.data)."),
    ] = None,
) -> None:
    """Create a run (or a sweep of runs) and queue its first attempt."""
    from cluster import evals, runs

    if eval_data is not None and eval_task is None:
        raise errors.UsageError("--eval-data: only with --eval")
    if eval_task is not None and follow:
        raise errors.UsageError("--eval and --follow: follow the run with pixpro logs RUN --follow")

    planned: dict[str, Any] = {
        "nodes": nodes,
        "gpus": gpus,
        "executor": executor,
        "overrides": sets or (),
        "dry_run": dry_run,
        "preflight": not no_preflight,
        # --eval's own problems (its data) are usage errors: found before the preflight's seconds
        "check": lambda resolved: evals.for_submit(eval_task, eval_data, resolved),
    }
    if sweep:
        if follow:
            raise errors.UsageError("--follow: follow one member of a sweep with pixpro logs RUN --follow")
        from cluster import sweep_ops

        sweep_plan = sweep_ops.plan_sweep(spec, sweep, max_parallel=max_parallel, **planned)
        _submit_sweep(
            sweep_plan, dry_run, as_json, evals.for_submit(eval_task, eval_data, sweep_plan.plans[0].spec)
        )
        return
    if max_parallel is not None:
        raise errors.UsageError("--max-parallel: only with --sweep")
    plan = runs.plan_submission(spec, **planned)
    eval_of = evals.for_submit(eval_task, eval_data, plan.spec)
    if dry_run:
        if as_json:
            payload = {
                "run_id": plan.run_id,
                "executor": plan.executor,
                "cluster_checked": plan.cluster_checked,
                "unchecked": plan.description.unchecked,
                "spec": plan.spec.model_dump(mode="json"),
                "sbatch": plan.script,
                "torchrun": plan.torchrun_command(),
            }
            typer.echo(json.dumps(payload, indent=2))
        else:
            typer.echo(plan.dry_run_text(), nl=False)
        return
    record, job_id, warning = runs.submit(plan)
    if warning:
        _err(f"warning: {warning}")
    queued = _queue_evals([record], eval_of)
    _announce(record.run_id, job_id, record.executor, as_json, "submitted", queued)
    if follow:
        raise typer.Exit(_follow(record.run_id, job_id, None))


def _submit_sweep(plan: Any, dry_run: bool, as_json: bool, eval_of: tuple[str, str] | None = None) -> None:
    from cluster import sweep_ops

    if dry_run:
        typer.echo(json.dumps(plan.payload(), indent=2) if as_json else plan.dry_run_text(), nl=as_json)
        return
    record, members, warnings = sweep_ops.submit_sweep(plan)
    for w in warnings:
        _err(f"warning: {w}")
    queued = _queue_evals(members, eval_of)
    if as_json:
        rows = [{"run_id": m.run_id, "job_id": m.latest_job, "sweep_values": m.sweep_values} for m in members]
        payload = {"sweep_id": record.sweep_id, "array_job": record.array_job, "members": rows}
        typer.echo(json.dumps(payload | ({"evals": queued} if eval_of else {})))
        return
    typer.echo(f"submitted sweep {record.sweep_id}: {len(members)} runs ({record.executor})")
    for m in members:
        values = " ".join(f"{k}={json.dumps(v)}" for k, v in m.sweep_values.items())
        typer.echo(f"  {m.run_id}  {m.latest_job or '(waits for a slot)'}  {values}")
    _announce_evals(queued)
    typer.echo(f"  pixpro status {record.sweep_id}    pixpro cancel {record.sweep_id}")


def _queue_evals(records: list[Any], eval_of: tuple[str, str] | None) -> list[dict[str, Any]]:
    from cluster import evals

    queued, warnings = evals.queue_after(records, eval_of)
    for w in warnings:
        _err(f"warning: {w}")
    return queued


def _announce_evals(queued: list[dict[str, Any]]) -> None:
    for ev in queued:
        after = f"after job {ev['after']}" if ev["after"] else "when the run completed"
        typer.echo(f"  eval {ev['eval_id']} of run {ev['run_id']}: job {ev['job_id']}, {after}")


def _announce(
    run_id: str,
    job_id: str,
    executor: str,
    as_json: bool,
    verb: str,
    queued: list[dict[str, Any]] | None = None,
) -> None:
    if as_json:
        typer.echo(json.dumps({"run_id": run_id, "job_id": job_id} | ({"evals": queued} if queued else {})))
    else:
        typer.echo(f"{verb} run {run_id} as job {job_id} ({executor})")
        _announce_evals(queued or [])
        typer.echo(f"  pixpro status {run_id}    pixpro logs {job_id} --follow    pixpro cancel {run_id}")


def _follow(ident: str, job_id: str | None, rank: int | None) -> int:
    from cluster import logs
    from cluster.executors import executor
    from cluster.index import Index
    from cluster.status import read_all_progress

    record = Index().find(ident)
    job = job_id or record.latest_job
    if job is None:
        _err(f"run {record.run_id} has no attempts")
        return EXIT_FAILURE

    def state_of() -> Any:
        rec = Index().find(record.run_id)  # anew: a cancel marks its attempts in the record
        trainer = read_all_progress([rec])[rec.run_id].trainer
        return executor(rec.executor).job(rec, job).state(trainer)

    try:
        code = logs.follow(record, job, rank, state_of)
    except KeyboardInterrupt:
        _err(f"stopped following; the run goes on (pixpro logs {job} --follow)")
        return EXIT_INTERRUPTED
    _err(f"job {job} ended: {state_of().label()}; exit status {code}")
    return code


# ----------------------------------------------------------------------------------------- resume
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "sacct")
"""What resuming a SLURM run runs: submitit's sbatch (it looks for srun first), and the state queries."""


def _refuse_blind_resume(what: str, idents: list[str]) -> None:
    """Before a SLURM run or sweep is resumed, SLURM's commands must be on PATH (exit 2, not submitit's
    traceback); whether SLURM answers for the latest attempts is checked under the runs' locks
    (:func:`cluster.runs.refuse_unanswered`)."""
    import shutil

    from cluster.index import Index

    index = Index()
    records = [r for r in (index.find(i) for i in idents) if r.executor == "slurm"]
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if records and missing:
        what = what or f"run {records[0].run_id}"
        raise errors.UsageError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH: {what} runs on SLURM "
            "(resume it where SLURM's commands are)"
        )


@app.command()
@guard
def resume(
    ident: Annotated[str, typer.Argument(metavar="ID", help="Run id or the job id of any of its attempts.")],
    as_json: Annotated[bool, typer.Option("--json", help='Print {"run_id", "job_id"} only.')] = False,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the log until the attempt ends.")] = False,
    include_node: Annotated[
        list[str] | None,
        typer.Option(
            "--include-node",
            metavar="NODE",
            help="Give a node the run left out (it failed twice) another chance; repeatable.",
        ),
    ] = None,
) -> None:
    """Queue a new attempt that continues from the run's last committed checkpoint.

    Nodes that failed the run twice (killed, crashed, hung, a CUDA error) are left out (sbatch
    --exclude); pixpro status lists them."""
    from cluster import runs
    from cluster.sweep import find_sweep

    group = find_sweep(_check_id(ident))
    if group is not None:
        if include_node or follow:
            raise errors.UsageError("--include-node and --follow act on one run: give a member's run id")
        from cluster.sweep_ops import resume_sweep

        _refuse_blind_resume(f"sweep {group.sweep_id}", group.run_ids)
        resumed = resume_sweep(group)
        if as_json:
            typer.echo(json.dumps([{"run_id": r, "job_id": j} for r, j in resumed]))
        elif not resumed:
            typer.echo(f"sweep {group.sweep_id}: every member completed or is still queued or running")
        for run_id, job_id in [] if as_json else resumed:
            typer.echo(
                f"resumed run {run_id} as job {job_id}"
                if job_id
                else f"run {run_id} resumes when fewer than {group.max_parallel} members run (--max-parallel)"
            )
        return
    _refuse_blind_resume("", [ident])
    record, queued, warning = runs.resume(ident, include_node or [])
    if queued is None:
        done = {"run_id": record.run_id, "job_id": None}
        typer.echo(json.dumps(done) if as_json else f"run {record.run_id} completed: nothing to resume")
        return
    if warning:
        _err(f"warning: {warning}")
    _announce(record.run_id, queued, record.executor, as_json, "resumed")
    if follow:
        raise typer.Exit(_follow(record.run_id, queued, None))


# ----------------------------------------------------------------------------------------- status
@app.command()
@guard
def status(
    ident: Annotated[
        str | None, typer.Argument(metavar="ID", help="Run id or job id (default: all runs).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON: a list of runs, or one object for ID.")
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option(help="Seconds between refreshes with --watch (0.5 to 3600).")
    ] = 5.0,
) -> None:
    """Runs, their attempts and states, progress, last checkpoint, LR, EMA momentum and throughput."""
    hot.status(ident, as_json, watch, interval)


# ----------------------------------------------------------------------------------------- logs / cancel
@app.command()
@guard
def logs(
    ident: Annotated[str, typer.Argument(metavar="ID", help="Run id (its latest attempt) or job id.")],
    rank: Annotated[int | None, typer.Option(help="Only lines of this trainer rank.", min=0)] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the attempt ends.")
    ] = False,
) -> None:
    """Print (or follow) an attempt's log."""
    from cluster import logs as logs_mod
    from cluster.errors import NotFound
    from cluster.evals import find_run
    from cluster.executors import executor
    from cluster.index import Index
    from cluster.sweep import find_sweep
    from cluster.torchrun import procs_per_node

    group = find_sweep(_check_id(ident))
    if group is not None:
        raise errors.UsageError(
            f"{group.sweep_id} is a sweep: give a member's run id (pixpro status {group.sweep_id} lists them)"
        )
    record, evaluation = find_run(Index(), ident)
    if evaluation is not None:
        if follow or rank is not None:
            raise errors.UsageError(f"{ident} is an evaluation's job: its log is printed whole")
        path = executor(record.executor).eval_log(record, evaluation)
        if not path.is_file():
            raise NotFound(f"no log yet for evaluation job {ident} ({path})")
        sys.stdout.write(path.read_text(errors="replace"))
        return
    job = ident if ident in record.attempts else record.latest_job
    if job is None:
        raise NotFound(f"run {record.run_id} has no attempts yet")
    world = record.nodes * procs_per_node(record.gpus_per_node)
    if rank is not None and rank >= world:
        raise errors.UsageError(f"--rank {rank}: run {record.run_id} has ranks 0 to {world - 1}")
    if follow:
        raise typer.Exit(_follow(record.run_id, job, rank))
    found, printed = logs_mod.print_logs(logs_mod.log_files(record, job), rank, sys.stdout)
    if not found:
        _err(f"no log yet for job {job} (pending?)")
    elif rank is not None and not printed:
        _err(f"no lines from rank {rank} in job {job}'s log (ranks other than 0 log warnings only)")


@app.command()
@guard
def cancel(
    ident: Annotated[
        str, typer.Argument(metavar="ID", help="Run id, or the job id of an attempt or evaluation.")
    ],
) -> None:
    """Stop every queued or running attempt of the run and mark it cancelled (resume later if you like);
    an evaluation's job id stops that evaluation only."""
    from cluster import runs
    from cluster.sweep import find_sweep

    group = find_sweep(_check_id(ident))
    if group is not None:
        from cluster.sweep_ops import cancel_sweep

        for run_id, jobs in cancel_sweep(group):
            typer.echo(
                f"cancelled run {run_id}: job(s) {', '.join(jobs)}"
                if jobs
                else f"run {run_id}: nothing to cancel"
            )
        return
    from cluster import evals
    from cluster.index import Index

    record, request = evals.find_run(Index(), ident)
    if request is not None:  # an evaluation's job id
        cancelled = evals.cancel(record, request)
        typer.echo(
            f"cancelled eval {request.eval_id} of run {record.run_id}: job {request.job_id}"
            if cancelled
            else f"eval {request.eval_id} of run {record.run_id} has nothing to cancel"
        )
        return
    record, jobs, warning = runs.cancel(ident)
    if warning:
        _err(f"warning: {warning}")
    if jobs:
        typer.echo(f"cancelled run {record.run_id}: job(s) {', '.join(jobs)}")
    elif not record.attempts and record.paths.cancel_marker.exists():  # a sweep member waiting for a slot
        typer.echo(f"cancelled run {record.run_id} before it started")
    else:
        typer.echo(f"run {record.run_id} has nothing to cancel")


# --- results: compute-side tools run in their own process (the login-node CLI never imports torch) ---
FIGURE_HELP = "Figure to write: .png, .svg, .pdf or .jpg."
_SOURCE = typer.Argument(metavar="RUN", help="Run id, run folder, checkpoint folder/URL or .pt file.")


@app.command("export")
@guard
def export_(
    ident: Annotated[str, _SOURCE],
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
    fmt: Annotated[str, typer.Option("--format", help=" or ".join(EXPORT_FORMATS) + ".")] = "torchvision",
    spec: Annotated[Path | None, typer.Option(help="The run's spec (default: spec.json of the run).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
) -> None:
    """Export the online encoder: a torchvision state_dict or a detectron2 weights pickle."""
    refusal = export_refusal(fmt, output, force)  # at once, not after the tool's imports
    if refusal:
        raise errors.UsageError(refusal)
    _refuse_non_file(output)
    args = [source(ident), "--format", fmt, "-o", str(output)]
    run_tool("export", args + (["--spec", str(spec)] if spec else []) + (["--force"] if force else []))


@app.command("eval")
@guard
def eval_(
    ident: Annotated[
        str, typer.Argument(metavar="RUN", help=_SOURCE.help + " With --submit: a run or sweep id.")
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="dense: a folder with images/ and masks/ (e.g. the demo data); linear/knn: a folder or "
            "pack of class sub-folders (or train/ and val/), or the demo scenes (dominant class). "
            "With --submit it defaults to the spec's monitor.data."
        ),
    ] = None,
    task: Annotated[str, typer.Option(help="dense (mIoU probe), linear or knn (top-1/top-5).")] = "dense",
    random_init: Annotated[bool, typer.Option(help="Score the untrained architecture instead.")] = False,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the probe or classifier.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    spec: Annotated[Path | None, typer.Option(help="The run's spec (default: spec.json of the run).")] = None,
    submit_job: Annotated[
        bool,
        typer.Option(
            "--submit",
            help="Run it as a job through the run's executor (on SLURM one node with --gpus); the result "
            "goes into the run folder and pixpro status RUN shows it.",
        ),
    ] = False,
    after: Annotated[
        bool, typer.Option("--after", help="With --submit: start when the run completed (SLURM afterok).")
    ] = False,
    gpus: Annotated[
        int | None,
        typer.Option("--gpus", help="With --submit: GPUs of the job (default 1 where the run used GPUs)."),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="resources.KEY=VALUE", help="With --submit: the job's resources (partition ...)."
        ),
    ] = None,
) -> None:
    """Evaluate the frozen encoder: dense linear probe (mIoU on per-pixel labels), or linear
    classification / weighted kNN on global-pooled features (top-1/top-5), on a held-out split.

    With --submit the evaluation runs as a job of the run's executor, and --after queues it to start
    when the run completed."""
    from cluster import evals

    if submit_job:
        if random_init or spec is not None:
            raise errors.UsageError("--random-init and --spec do not go with --submit: it evaluates the run")
        from cluster.executors import executor
        from cluster.sweep import find_sweep

        group = find_sweep(_check_id(ident))
        queued = [
            evals.submit_for_run(run_id, task, data, seed=seed, after=after, gpus=gpus, sets=sets or ())
            for run_id in (group.run_ids if group else [ident])
        ]
        if as_json:
            rows = [{"run_id": rec.run_id, **req.model_dump(mode="json")} for rec, req in queued]
            typer.echo(json.dumps(rows if group else rows[0]))
            return
        for record, request in queued:
            typer.echo(evals.summary(record, request))
            log = executor(record.executor).eval_log(record, request)
            typer.echo(f"  pixpro status {record.run_id}    its log: {log}")
        return
    if after or gpus is not None or sets:
        raise errors.UsageError("--after, --gpus and --set go with --submit")
    if not data:
        raise errors.UsageError("--data: labelled data to evaluate on is required (without --submit)")
    evals.check_request(task, data)  # at once, not after the tool's imports
    args = [source(ident, strict=not random_init), "--data", data, "--seed", str(seed)]
    args += (["--random-init"] if random_init else []) + (["--json"] if as_json else [])
    args += ["--task", task] if task != "dense" else []
    run_tool(EVAL_TOOLS[task], args + (["--spec", str(spec)] if spec else []))


EVAL_TOOLS = {"dense": "probe", "linear": "classify", "knn": "classify"}
"""``pixpro eval --task`` -> the tool module that runs it."""


@app.command()
@guard
def viz(
    image: Annotated[Path, typer.Argument(help="An image to augment.")],
    output: Annotated[Path, typer.Option("-o", "--output", help=FIGURE_HELP)],
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Augmentation seed.")] = 0,
    crop: Annotated[int, typer.Option(help="View size in pixels (32 to 1024).")] = 224,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
) -> None:
    """Draw two augmented views with cell centres and one cell's positive matches (PNG)."""
    if not image.is_file():  # at once, not after the tool's imports
        raise errors.NotFound(f"image {image} " + ("is a folder" if image.is_dir() else "does not exist"))
    _refuse_output(output, force)
    args = ["pairs", str(image), "-o", str(output), "--seed", str(seed), "--crop", str(crop)]
    run_tool("viz", args + (["--force"] if force else []))


def _refuse_output(output: Path, force: bool) -> None:
    refusal = output_refusal(output, force)  # at once, not after the tool's imports
    if refusal:
        raise errors.UsageError(refusal)


def _refuse_non_file(output: Path) -> None:
    """An ``-o`` that exists and is not a regular file (a FIFO, a device, a dangling link) is refused at
    once: ``--force`` replaces a file's contents, never a device or a link with a file."""
    try:
        atomic_write_target(output)
    except OSError as exc:
        raise errors.UsageError(f"cannot write {output}: {exc.strerror or exc}") from None


@app.command()
@guard
def plot(
    ident: Annotated[str, _SOURCE],
    output: Annotated[Path, typer.Option("-o", "--output", help=FIGURE_HELP)],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
) -> None:
    """Plot loss, LR and EMA momentum against step, marking each preemption/resume (PNG)."""
    _refuse_output(output, force)
    _refuse_non_file(output)
    run_tool("viz", ["plot", source(ident), "-o", str(output)] + (["--force"] if force else []))


@app.command()
@guard
def pack(
    src: Annotated[str, typer.Argument(help="Folder or URL of JPEG/PNG images (class folders or flat).")],
    dest: Annotated[str, typer.Argument(help="Folder or URL for the shards, index and manifest.")],
    shard_size: Annotated[str, typer.Option(help="Target shard size, e.g. 512MB, 1GB.")] = "512MB",
    workers: Annotated[
        int | None, typer.Option(min=1, help="Processes (default: every core; at most 4 per core).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Pack images into tar shards with a flat index (set data.root to DEST, an empty or new folder); a
    killed pack continues, a finished one is verified."""
    args = [src, dest, f"--shard-size={shard_size}"] + (
        [f"--workers={workers}"] if workers is not None else []
    )
    run_tool("pack", args + (["--json"] if as_json else []))


if __name__ == "__main__":
    app()
