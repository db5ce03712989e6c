"""Shared helpers for trainer tests: a tiny CPU run spec, launching the trainer, reading final states."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from tests.support import zygote

REPO = Path(__file__).resolve().parents[2]
TINY_BACKBONE = "squeezenet1_1"
"""The end-to-end tests' backbone: 0.7 M parameters and an 11 MB checkpoint (resnet18: 11 M and 135 MB),
about 8x less CPU a step; what they test (resume, preemption, stores, the CLI) is the same for any
backbone, and the resnet family has tests of its own (model, LARS, SyncBN, export, preflight)."""


def tiny_spec(data_root: Path, **overrides: Any) -> dict:
    """:data:`TINY_BACKBONE` at 64 px on 24 synthetic images: 6 steps an epoch, 10 steps in all."""
    spec = {
        "name": "tiny",
        "seed": 3,
        "data": {
            "root": str(data_root),
            "demo": {"num_images": 24, "image_size": 72, "seed": 1},
            "crop_size": 64,
            "crop_scale": [0.3, 1.0],
            "batch_size": 4,
            "num_workers": 0,
        },
        "model": {"backbone": TINY_BACKBONE, "projector_hidden": 64, "projector_out": 32},
        "optim": {"epochs": 2, "warmup_epochs": 0.5, "max_steps": 10, "base_lr": 1.0},
        "precision": "fp32",
        "threads": 1,
        "checkpoint": {"every_steps": 3, "every_minutes": None, "keep_last": 3},
        "log_every_steps": 1,
        "resources": {"time_limit_min": 30},
    }
    return set_nested(spec, **overrides)


def set_nested(spec: dict, **over: Any) -> dict:
    """``spec`` with ``over`` applied in place; ``a__b`` names the nested key ``a.b``."""
    for dotted, value in over.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec, indent=2))
    return path


def trainer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXPRO_", "SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def trainer_cmd(spec: Path, run_dir: Path, nproc: int = 1, max_restarts: int = 0) -> list[str]:
    """``python -m launch.train`` for one process, else ``nproc`` ranks under our torchrun wrapper."""
    args = [str(spec), "--run-dir", str(run_dir)]
    if nproc == 1 and max_restarts == 0:
        return [sys.executable, "-m", "launch.train", *args]
    return [
        sys.executable,
        "-m",
        "launch.run",
        "--nnodes",
        "1",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        f"--max-restarts={max_restarts}",
        "--",
        *args,
    ]


def run_trainer(
    spec: Path, run_dir: Path, nproc: int = 1, timeout: float = 300, max_restarts: int = 0, **env: str
) -> subprocess.CompletedProcess:
    """Run the trainer to the end (see :func:`trainer_cmd`), output captured."""
    return zygote.run(
        trainer_cmd(spec, run_dir, nproc, max_restarts),
        cwd=REPO,
        env=trainer_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_trainer(spec: Path, run_dir: Path, **env: str) -> zygote.Child | subprocess.Popen:
    """One trainer process in the background, stdout and stderr merged (read it with :class:`Tail`)."""
    return zygote.popen(
        trainer_cmd(spec, run_dir),
        cwd=REPO,
        env=trainer_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def start_ranks(
    spec: Path, run_dir: Path, nproc: int = 2, max_restarts: int = 0, **env: str
) -> zygote.Child | subprocess.Popen:
    """``nproc`` ranks under our torchrun wrapper in the background, in a session of their own (as the
    node task starts it), stdout and stderr merged (read it with :class:`Tail`)."""
    return zygote.popen(
        trainer_cmd(spec, run_dir, nproc=nproc, max_restarts=max_restarts),
        cwd=REPO,
        env=trainer_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


class Tail:
    """Collects a subprocess's output lines on a thread, so the test can wait for a given log line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import threading

        assert proc.stdout is not None
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(
            target=lambda: self.lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
            daemon=True,
        )
        self.thread.start()

    def __enter__(self) -> Tail:
        return self

    def __exit__(self, *exc: object) -> None:
        """A test that fails mid-way leaves no trainer running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def has(self, needle: str) -> bool:
        return any(needle in line for line in self.lines)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 180) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not self.has(needle):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.05)


def final_state(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Every file of the newest committed checkpoint, loaded (weights only)."""
    from launch.store import CheckpointStore

    store = CheckpointStore(url, storage_options)
    manifest = store.resolve()
    assert manifest is not None, f"no committed checkpoint under {url}"
    return {
        name: torch.load(io.BytesIO(store.read(manifest, name)), weights_only=True) for name in manifest.names
    } | {"__step__": manifest.step}


def assert_identical(a: Any, b: Any, path: str = "state") -> None:
    """Zero tolerance: same structure, same dtypes, bitwise equal tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), (
            f"{path} differs (max abs diff {(a.double() - b.double()).abs().max().item()})"
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
