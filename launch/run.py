"""Per-node launcher: torchrun in this process, made safe for preemption signals.

    python -m launch.run [torchrun options] -- SPEC --run-dir DIR

torchrun would die from SLURM's user signal (default action) and would SIGKILL its workers 30 s after
a SIGTERM. Here the agent instead forwards SIGTERM and the user signal to its workers and waits: they
agree on a step, commit a checkpoint and exit 0 with a marker (so torchrun does not restart them);
this process then exits with :data:`launch.preempt.EXIT_PREEMPTED`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from launch.preempt import EXIT_PREEMPTED, forward_to_children, preemption_signals


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m launch.run [torchrun options] -- SPEC [--run-dir DIR]", file=sys.stderr)
        return 2
    cut = argv.index("--")
    torchrun_args, trainer_args = argv[:cut], argv[cut + 1 :]
    user_signal = os.environ.get("PIXPRO_SIGNAL", "USR2")
    # torchrun's own handlers stay on SIGINT/HUP/QUIT; SIGTERM and the user signal go to the trainers.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    forward_to_children(preemption_signals(user_signal))
    with tempfile.TemporaryDirectory(prefix="pixpro-exit-") as exit_dir:
        os.environ["PIXPRO_EXIT_DIR"] = exit_dir
        from torch.distributed.run import main as torchrun_main

        try:
            torchrun_main([*torchrun_args, "-m", "launch.train", *trainer_args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:
            print(f"pixpro: training failed: {type(exc).__name__}", file=sys.stderr)
            code = 1
        if any(Path(exit_dir).glob("preempted.*")):
            return EXIT_PREEMPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
