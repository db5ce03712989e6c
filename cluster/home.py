"""Where pixpro keeps its own state on the submitting machine: run folders and the run index.

``$PIXPRO_HOME`` (default ``~/.local/state/pixpro``) must be on a file system every node sees when
jobs go to SLURM: the run folder holds the resolved spec, the submitit pickles and the logs.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from cluster.errors import UsageError
from schemas.contract import HOME_ENV

DEFAULT_HOME = "~/.local/state/pixpro"


def pixpro_home() -> Path:
    home = Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().absolute()
    if home.exists() and not home.is_dir():
        raise UsageError(f"{HOME_ENV} {home} is a file, not a folder for pixpro's runs")
    return home


def runs_dir(home: Path | None = None) -> Path:
    return (home or pixpro_home()) / "runs"


def run_dir(run_id: str, home: Path | None = None) -> Path:
    return runs_dir(home) / run_id


def new_run_id(name: str, now: float | None = None) -> str:
    """``<name>-<yyyymmdd-HHMMSS>-<4 hex>``: sortable by creation time, unique without a lock."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    return f"{name}-{stamp}-{secrets.token_hex(2)}"
