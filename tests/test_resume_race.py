"""Two ``pixpro resume`` of one run at once queue one attempt: the run's lock is held from the check for
an attempt still queued or running through the submit and the record's save. Without it both passed the
check, both queued, and the record kept only the last: the other attempt trained where neither
``pixpro status`` nor ``pixpro cancel`` could see it."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from schemas.contract import STEP_PAUSE_ENV
from tests.support.cli import PIXPRO, STEP_PAUSE_S, cli
from tests.support.procs import wait_for
from tests.support.trainer import tiny_spec, write_spec

pytestmark = [pytest.mark.slow]


def test_two_resumes_at_once_queue_one_attempt(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = write_spec(tmp_path / "tiny.json", tiny_spec(tmp_path / "data", name=f"r{uuid.uuid4().hex[:8]}"))
    first = cli("submit", "--executor", "local", "--json", str(spec), home=home, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_id = json.loads(first.stdout)["run_id"]
    assert cli("cancel", run_id, home=home).returncode == 0
    wait_for("the cancel to land", lambda: _state(home, run_id) == "CANCELLED", 120, 0.2)
    env = {**os.environ, "PIXPRO_HOME": str(home), STEP_PAUSE_ENV: STEP_PAUSE_S}
    both = [
        subprocess.Popen(
            [PIXPRO, "resume", run_id],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in both]
    codes = sorted(p.returncode for p in both)
    try:
        assert codes == [0, 1], outs
        refused = next(err for p, (_, err) in zip(both, outs, strict=True) if p.returncode == 1)
        assert f"run {run_id} still has attempt" in refused, refused
        row = json.loads(cli("status", run_id, "--json", home=home).stdout)
        record = json.loads((Path(row["run_dir"]) / "run.json").read_bytes())
        assert len(record["attempts"]) == 2, record  # the first and one resume
        wait_for(
            "the resumed attempt to show", lambda: _state(home, run_id) in ("PENDING", "RUNNING"), 60, 0.2
        )
    finally:
        cli("cancel", run_id, home=home)


def _state(home: Path, run_id: str) -> str:
    return json.loads(cli("status", run_id, "--json", home=home).stdout)["state"]
