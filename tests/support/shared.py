"""Expensive results made once per test session, however many pytest-xdist workers ask for them."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name`` as ``make(folder)`` left it, made by the first process to ask.

    Under xdist each worker has a base temp folder of its own below a common parent: the folder lives
    there, behind a file lock, so the other workers wait for the first one's result instead of
    repeating it. A ``make`` that fails leaves no result, and the next process to ask tries again.
    """
    base = factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed make left
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def run_once(factory: pytest.TempPathFactory, name: str, spec: dict, nproc: int = 1) -> Path:
    """A trainer run of ``spec`` made once a session (:func:`once`): ``run/spec.json``, ``run/checkpoints``,
    its demo dataset in ``data/`` (``spec``'s data root is replaced: it is part of the spec hash)."""
    from tests.support.trainer import run_trainer, write_spec

    def make(folder: Path) -> None:
        (folder / "run").mkdir()
        spec["data"]["root"] = str(folder / "data")
        res = run_trainer(write_spec(folder / "run" / "spec.json", spec), folder / "run", nproc=nproc)
        assert res.returncode == 0, res.stderr[-3000:]

    return once(factory, name, make)


def run_fixtures(run: str) -> tuple[Any, Any]:
    """Module fixtures ``data_root`` and ``golden`` over the fixture ``run`` (a :func:`run_once` folder):
    tests that train on its dataset get the same spec hash, so their states compare bitwise to its own."""

    @pytest.fixture(scope="module")
    def data_root(request: pytest.FixtureRequest) -> Path:
        return request.getfixturevalue(run) / "data"

    @pytest.fixture(scope="module")
    def golden(request: pytest.FixtureRequest) -> dict[str, Any]:
        from tests.support.trainer import final_state

        return final_state(str(request.getfixturevalue(run) / "run" / "checkpoints"))

    return data_root, golden
