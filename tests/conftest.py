"""Shared fixtures: the moto S3 server and fault proxy live in tests/conftest_s3.py."""

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.conftest_s3"]

# The local test cluster (cluster/slurm/setup.sh) changes nothing outside its folder: its client
# commands find it through SLURM_CONF, and in jobcomp mode its sacct wrapper comes first on PATH.
# Everything the tests start (pixpro, sbatch) inherits both; jobs inherit them from sbatch.
SLURM_DIR = Path(os.environ.get("PIXPRO_SLURM_DIR") or "/var/lib/pixpro-slurm")
if "SLURM_CONF" not in os.environ and (SLURM_DIR / "etc" / "slurm.conf").is_file():
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "etc" / "slurm.conf")
if (SLURM_DIR / "bin").is_dir() and str(SLURM_DIR / "bin") not in os.environ.get("PATH", "").split(":"):
    os.environ["PATH"] = f"{SLURM_DIR / 'bin'}:{os.environ.get('PATH', '')}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Where a test module's tiny demo dataset is generated (on first use by the trainer)."""
    return tmp_path_factory.mktemp("data") / "tiny"
