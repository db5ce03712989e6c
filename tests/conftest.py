"""Shared fixtures: the moto S3 server and fault proxy live in tests/conftest_s3.py.

``make test`` runs the tests in parallel (pytest-xdist, ``--dist loadgroup``): tests in one
``xdist_group`` run on one worker, one after another. Every test of the ``cluster`` marker joins the
group ``slurm``: the local cluster's two nodes are shared, and some tests need both idle.
"""

import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.conftest_s3"]

# Under xdist (make test: three workers on two cores) each worker, and every process it starts,
# computes on one thread: torch's default of one OpenMP thread per core, in three workers at once, spent
# a third of the in-process tests' CPU spinning in OpenMP's waits (benches/RESULTS.md, the test suite).
# Trainers take their threads from the spec either way; a value the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The local test cluster (cluster/slurm/setup.sh) changes nothing outside its folder: its client
# commands find it through SLURM_CONF, and in jobcomp mode its sacct wrapper comes first on PATH.
# Everything the tests start (pixpro, sbatch) inherits both; jobs inherit them from sbatch.
SLURM_DIR = Path(os.environ.get("PIXPRO_SLURM_DIR") or "/var/lib/pixpro-slurm")


def _controller_answers(conf: Path) -> bool:
    """The cluster's slurmctld takes a connection. Installed but stopped (the machine restarted since
    ``make services``), every ``squeue`` would retry for 18 s before failing: the tests that do not need
    the cluster then get the immediate failure of a machine without one, and the cluster's own tests
    fail on their first command, as they would with SLURM_CONF set."""
    text = conf.read_text()
    host = re.search(r"^SlurmctldHost=([^(\s]+)(?:\(([^)\s]+)\))?", text, re.M)
    port = re.search(r"^SlurmctldPort=(\d+)", text, re.M)
    address = (host.group(2) or host.group(1)) if host else "127.0.0.1"
    try:
        socket.create_connection((address, int(port.group(1)) if port else 6817), 2).close()
    except OSError:
        return False
    return True


if (
    "SLURM_CONF" not in os.environ
    and (SLURM_DIR / "etc" / "slurm.conf").is_file()
    and _controller_answers(SLURM_DIR / "etc" / "slurm.conf")
):
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "etc" / "slurm.conf")
if (SLURM_DIR / "bin").is_dir() and str(SLURM_DIR / "bin") not in os.environ.get("PATH", "").split(":"):
    os.environ["PATH"] = f"{SLURM_DIR / 'bin'}:{os.environ.get('PATH', '')}"


def pytest_collection_finish(session: pytest.Session) -> None:
    """``--dist loadgroup`` must keep each group on one worker (the SLURM tests share one cluster); with
    pytest 9.2 and pytest-xdist 3.8 it silently does not (pytest-xdist#1386): refuse to run instead."""
    if not getattr(session.config.option, "loadgroup", False):  # set by xdist for --dist loadgroup
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        line = (
            f"pytest-xdist's loadgroup is not in effect ({lost[0]} has no group suffix): pytest "
            f"{pytest.__version__} with this pytest-xdist spreads a group over workers; see pyproject.toml"
        )
        print(line, file=sys.__stderr__, flush=True)  # a worker's error reaches the controller mangled
        raise pytest.UsageError(line)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every node of the local SLURM cluster sees (one machine: /tmp is shared)."""
    path = Path("/tmp/pixpro-slurm-tests") / uuid.uuid4().hex[:10]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Where a test module's tiny demo dataset is generated (on first use by the trainer)."""
    return tmp_path_factory.mktemp("data") / "tiny"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished run of :func:`tests.support.trainer.tiny_spec` (10 steps, one process), made once a
    session and only read by its users: ``run/spec.json``, ``run/checkpoints/``, its dataset in ``data/``
    (the data root is part of the spec hash, so a test that compares bitwise against this run trains
    on ``data/`` too)."""
    from tests.support.shared import run_once
    from tests.support.trainer import tiny_spec

    return run_once(tmp_path_factory, "tiny-run", tiny_spec(Path("data")))
