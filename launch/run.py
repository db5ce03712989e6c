"""Per-node launcher: torchrun in this process, made safe for preemption signals.

    python -m launch.run [torchrun options] -- SPEC --run-dir DIR

torchrun would die from SLURM's user signal (default action) and would SIGKILL its workers 30 s after
a SIGTERM. Here the agent instead forwards SIGTERM and the user signal to its workers and waits: they
agree on a step, commit a checkpoint and exit 0 with a marker (so torchrun does not restart them);
this process then exits with :data:`launch.preempt.EXIT_PREEMPTED`. :mod:`launch.elastic` adjusts the
agent for multi-node restarts (one store per rendezvous round, broken groups killed at once);
:mod:`launch.watchdog` runs beside it and restarts a group whose rank stopped making progress.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from launch import elastic, forking
from launch.node_failures import RECORDER
from launch.preempt import EXIT_PREEMPTED, forward_to_children
from launch.watchdog import Watchdog, run_dir_of
from schemas.contract import (
    ATTEMPT_ENV,
    EXIT_DIR_ENV,
    PREEMPT_ENV,
    SIGNAL_ENV,
    Exit,
    exit_marker,
    preemption_signals,
)

TRAINER = "launch.train"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m launch.run [torchrun options] -- SPEC [--run-dir DIR]", file=sys.stderr)
        return Exit.USAGE
    cut = argv.index("--")
    torchrun_args, trainer_args = argv[:cut], argv[cut + 1 :]
    user_signal = os.environ.get(SIGNAL_ENV, "USR2")
    # torchrun's own handlers stay on SIGINT/HUP/QUIT (it overrides the environment variable with its
    # --signals-to-handle option); SIGTERM and the user signal go to the trainers, with no 30 s SIGKILL.
    if not any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in torchrun_args):
        torchrun_args = ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *torchrun_args]
    # Workers that torchrun starts after the signal (a restart racing the preemption) stop at once. The
    # node task started us with these signals held: one that came during our imports is taken here.
    preemption = preemption_signals(user_signal)
    forward_to_children(preemption, mark_env=PREEMPT_ENV)
    fork = None
    forking.spare_device_checks()  # torchrun's device check must not poison fork (launch.forking)
    if forking.enabled():  # the trainer's imports, paid once here instead of once per rank and restart
        from launch import train
        from pixpro import photometric_cpu

        photometric_cpu.precompile()  # numba's machine code, loaded once for every rank
        fork = (TRAINER, train.main)
    elastic.install(fork, hold=preemption)
    run_dir = run_dir_of(trainer_args)
    RECORDER.open(run_dir, os.environ.get(ATTEMPT_ENV) or "local")  # see launch.node_failures
    watchdog = Watchdog(run_dir).start()  # hung ranks: see launch.watchdog
    with tempfile.TemporaryDirectory(prefix="pixpro-exit-") as exit_dir:
        os.environ[EXIT_DIR_ENV] = exit_dir
        from torch.distributed.run import main as torchrun_main

        failure: str | None = None
        code: int = Exit.OK
        try:
            torchrun_main([*torchrun_args, "-m", TRAINER, *trainer_args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else Exit.FAILURE
        except Exception as exc:  # torchrun's ChildFailedError already printed the details
            code, failure = Exit.FAILURE, type(exc).__name__
        finally:
            watchdog.stop()
        if any(Path(exit_dir).glob(exit_marker("preempted", "*"))):
            return EXIT_PREEMPTED
        for outcome in ("diverged", "superseded"):  # no restart, no requeue: it would only repeat
            stopped = sorted(Path(exit_dir).glob(exit_marker(outcome, "*")))
            if stopped:
                reason = next((t for p in stopped if (t := p.read_text().strip())), outcome)
                print(f"pixpro: {reason}", file=sys.stderr)
                return Exit.FAILURE
        if failure:
            print(f"pixpro: training failed ({failure}); see the rank logs above", file=sys.stderr)
        if code and watchdog.last_hang:  # the restarts are spent: the hang is why
            print(f"pixpro: training failed after a hang: {watchdog.last_hang}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
