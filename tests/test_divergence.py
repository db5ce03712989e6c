"""A run that truly diverges (SGD at LR 1e10) stops cleanly: its bad steps are not applied, only finite
checkpoints are committed, no torchrun restart is spent on repeating it, and the run says DIVERGED."""

from __future__ import annotations

import io
import json

import pytest
import torch

from launch.store import CheckpointStore
from schemas.contract import STATUS_FILE
from tests.support import zygote
from tests.support.trainer import REPO, tiny_spec, trainer_cmd, trainer_env, write_spec

pytestmark = [pytest.mark.slow]


def test_an_absurd_learning_rate_ends_diverged_with_finite_checkpoints_and_no_restart(tmp_path, data_root):
    spec = write_spec(
        tmp_path / "spec.json",
        tiny_spec(
            data_root,
            optim__optimizer="sgd",
            model__backbone="resnet18",  # the dynamics below are resnet18's
            optim__base_lr=1e10,  # step 1 is finite and saved; from step 2 on every step overflows
            checkpoint__every_steps=1,
            resources__max_restarts=2,
        ),
    )
    run = tmp_path / "run"
    proc = zygote.run(
        trainer_cmd(spec, run, nproc=1, max_restarts=2),
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.startswith("pixpro: ")]
    assert len(last) == 1 and "diverged: 3 steps in a row were not finite" in last[0], out[-3000:]
    assert "Traceback" not in out
    assert "restart" not in out.lower()  # torchrun saw a clean exit: nothing to restart

    store = CheckpointStore(str(run / "checkpoints"))
    status = json.loads(store.read_aux(STATUS_FILE) or b"{}")
    assert status["state"] == "diverged" and status["diverged"] == last[0].removeprefix("pixpro: ")
    manifests = list(store.candidates())
    assert manifests, "the finite steps before the divergence were checkpointed"
    assert f"the last committed checkpoint is step {manifests[0].step}" in last[0]
    for manifest in manifests:
        for name in manifest.names:
            state = torch.load(io.BytesIO(store.read(manifest, name)), weights_only=True)
            for tensor in _tensors(state):
                assert torch.isfinite(tensor).all(), (manifest.step, name)


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []
