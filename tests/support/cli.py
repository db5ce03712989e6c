"""Helpers shared by the ``pixpro`` CLI tests: the tiny CPU spec, running the real console script,
and polling ``pixpro status --json``. No mocks: the CLI runs as users run it."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.contract import STEP_PAUSE_ENV
from tests.support.trainer import tiny_spec

REPO = Path(__file__).resolve().parents[2]
PIXPRO = str(Path(sys.executable).with_name("pixpro"))
SETUP_HINT = f"run `bash {REPO / 'cluster/slurm/setup.sh'}` as root first (it starts the local SLURM cluster)"


CLUSTER_TINY = {
    "seed": 0,
    "data__demo": {"num_images": 32, "image_size": 48, "seed": 0},
    "data__crop_size": 40,  # a 2x2 feature map (resnet18 and squeezenet1_1 need over 32 px)
    "data__crop_scale": [0.08, 1.0],
    "optim__epochs": 100,
    "optim__warmup_epochs": 1,
    "optim__max_steps": 20,
    "checkpoint__every_steps": 2,
    "resources": {"nodes": 1, "gpus_per_node": 0, "time_limit_min": 60, "signal_lead_s": 60},
}
"""The CLI/SLURM tests' run: 32 images of 48 px, crop 40, 20 steps, a commit every 2 steps (seconds a run)."""
STEP_PAUSE_S = "0.35"
"""What :func:`cli` runs pause after each step (``PIXPRO_STEP_PAUSE_S``): about a resnet18 step here, so
a run signalled, requeued or cancelled from outside is still training when it lands, at the CPU cost of
:data:`tests.support.trainer.TINY_BACKBONE`."""


def cluster_tiny_spec(data_root: Path, name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """:func:`tests.support.trainer.tiny_spec` with :data:`CLUSTER_TINY`."""
    return tiny_spec(data_root, **copy.deepcopy({**CLUSTER_TINY, **overrides})) | {"name": name}


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(json.dumps(spec, indent=2))
    return path


def cli(
    *args: str, home: Path, cwd: Path | None = None, timeout: float = 400, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``pixpro`` console script."""
    full_env = {**os.environ, "PIXPRO_HOME": str(home), STEP_PAUSE_ENV: STEP_PAUSE_S, **(env or {})}
    return subprocess.run(
        [PIXPRO, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full_env
    )


_COMMAND: Any = None


def run_cli(*args: str) -> tuple[int, str, str]:
    """``pixpro ARGS`` through the Typer app, in-process (about 1.5 ms; typer's ``CliRunner`` rebuilds
    the click command on every call, 36 ms): exit status, stdout, stderr."""
    global _COMMAND
    import typer

    if _COMMAND is None:
        from cluster.cli import app

        _COMMAND = typer.main.get_command(app)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rv = _COMMAND.main(args=list(args), prog_name="pixpro", standalone_mode=False)
        except typer.Exit as exc:
            rv = exc.exit_code
    return int(rv or 0), out.getvalue(), err.getvalue()


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pixpro: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def status_json(home: Path, ident: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = cli("status", ident, "--json", home=home, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def status_row(home: Path, ident: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """What ``pixpro status ID --json`` prints, made by the command's own code (``cluster.hot.status``)
    in this process, under the environment :func:`cli` gives the console script: a poll loop asks every
    second, and a console script costs a Python start each time (a quarter of a CPU second).
    :func:`status_json` runs the installed command itself."""
    import pytest

    from cluster import hot

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        for key, value in {"PIXPRO_HOME": str(home), **(env or {})}.items():
            mp.setenv(key, value)
        hot.status(ident, as_json=True, watch=False, interval=1.0)
    return json.loads(out.getvalue())


def wait_status(
    home: Path,
    ident: str,
    until: Callable[[dict[str, Any]], bool],
    timeout: float,
    seen: list[str] | None = None,
    env: dict[str, str] | None = None,
    interval: float = 1.0,
) -> dict[str, Any]:
    """Poll ``pixpro status ID --json`` (:func:`status_row`) until ``until(row)``; every state observed
    goes into ``seen``."""
    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = status_row(home, ident, env)
        if seen is not None and (not seen or seen[-1] != row["state"]):
            seen.append(row["state"])
        if until(row):
            return row
        if row["state"] in ("FAILED", "CANCELLED", "TIMEOUT") and not until(row):
            break
        time.sleep(interval)
    log = job_log(Path(row.get("run_dir", "")), row.get("job_id")) if row else ""
    raise AssertionError(f"timed out/ended waiting on {ident}: {row}\n--- job log tail ---\n{log}")


def job_log(run_dir: Path, job_id: str | None, lines: int = 60) -> str:
    texts = []
    for path in sorted((run_dir / "submitit").glob(f"{job_id}_*_log.out")) + sorted(
        (run_dir / "local").glob(f"{job_id}.log")
    ):
        texts.append(f"==> {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(texts)


def which_or_fail(*names: str) -> None:
    import pytest

    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not on PATH: {SETUP_HINT}", pytrace=False)
