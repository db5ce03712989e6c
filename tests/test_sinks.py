"""TensorBoard and W&B mirrors of the trainer's metrics: continuous across preemptions, never fatal."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.preempt import EXIT_PREEMPTED
from launch.records import read_metrics
from launch.sinks import MetricSinks, TensorBoardSink, scalars
from launch.store import CheckpointStore
from schemas.contract import STEP_PAUSE_ENV, TENSORBOARD_DIR, wandb_run_id
from tests.support.trainer import run_trainer, tiny_spec, write_spec
from tests.support.wandb_log import history


def read_tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar as tensorboard's own reader serves it: (step, value) in order, per tag."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_name_every_metric_and_leave_absent_ones_out() -> None:
    rec = {"step": 7, "loss": -1.5, "lr": 0.1, "ema_momentum": 0.99, "img_per_s": 12.0, "positives": 3.0}
    assert scalars(rec | {"commit_s": 0.25, "data_skips": 2}) == {
        "train/loss": -1.5,
        "train/lr": 0.1,
        "train/ema_momentum": 0.99,
        "train/img_per_s": 12.0,
        "train/positives_per_image": 3.0,
        "checkpoint/commit_s": 0.25,
        "data/skips": 2.0,
    }
    assert "checkpoint/commit_s" not in scalars(rec | {"commit_s": None})


def test_a_failing_sink_warns_once_and_the_others_keep_writing(tmp_path, caplog) -> None:
    def broken(first: int) -> TensorBoardSink:
        raise OSError("disk full")

    sinks = MetricSinks(
        {"broken": broken, "tensorboard": lambda first: TensorBoardSink(tmp_path, first, "a1")}
    )
    with caplog.at_level(logging.WARNING, logger="launch.sinks"):
        for step in (1, 2, 3):
            sinks.write({"step": step, "loss": float(step)})
        sinks.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken logging failed" in warnings[0] and "disk full" in warnings[0]
    assert read_tensorboard(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_a_stalled_sink_never_blocks_the_writer(tmp_path) -> None:
    release = threading.Event()

    class Stalled:
        def write(self, step: int, values: dict[str, float]) -> None:
            release.wait()

        def close(self) -> None:
            pass

    sinks = MetricSinks({"stalled": lambda first: Stalled()})
    for step in range(1, 20_001):  # twice the queue: the surplus is dropped, write() returns each time
        sinks.write({"step": step, "loss": 0.0})
    assert sinks._dropped > 0
    release.set()
    sinks.close()


def test_the_wandb_run_id_is_stable_and_safe() -> None:
    a = wandb_run_id("tiny-20261129-abc.1")
    assert a == wandb_run_id("tiny-20261129-abc.1") != wandb_run_id("tiny-20261129-abc.2")
    assert a.replace("-", "").isalnum() and len(a) <= 64


@pytest.mark.slow
def test_tensorboard_and_wandb_offline_are_continuous_across_a_resume(tmp_path, data_root) -> None:
    """Stop at step 5, lose that checkpoint so the resume repeats steps 4 and 5 from step 3, finish at
    10: tensorboard's reader sees each step once with the final values, and both attempts log to one
    W&B run (offline). A W&B key in the environment appears in no file the run wrote."""
    wandb_cfg = {"project": "pixpro-test", "mode": "offline", "tags": ["ci"]}
    spec = write_spec(tmp_path / "spec.json", tiny_spec(data_root, logging__wandb=wandb_cfg))
    run = tmp_path / "run"
    key = "0123456789abcdef0123456789abcdef01234567"
    env = {"WANDB_API_KEY": key, "WANDB_SILENT": "true"}
    # step 3 must be committed (not superseded) before step 5 stops the run: a pause after each step
    res = run_trainer(spec, run, PIXPRO_STOP_AT_STEP="5", **{STEP_PAUSE_ENV: "1"}, **env)
    assert res.returncode == EXIT_PREEMPTED, res.stderr[-3000:]
    (newest,) = (run / "checkpoints").glob("step-000000000005.*")
    shutil.rmtree(newest)  # as if the attempt died before its final commit: resume from step 3
    res = run_trainer(spec, run, **env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step 3" in res.stderr
    assert "logging failed" not in res.stderr

    log_dir = run / TENSORBOARD_DIR
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # one per attempt
    board = read_tensorboard(log_dir)
    records = read_metrics(CheckpointStore(str(run / "checkpoints")))  # latest attempt per step
    for tag, field in [("train/loss", "loss"), ("train/lr", "lr"), ("train/ema_momentum", "ema_momentum")]:
        assert [s for s, _ in board[tag]] == list(range(1, 11)), tag  # none twice, none missing
        assert [v for _, v in board[tag]] == pytest.approx([r[field] for r in records], rel=1e-6), tag
    assert {"train/img_per_s", "train/positives_per_image", "data/skips"} <= set(board)

    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(wandb_run_id("run")) for d in offline)
    logged = [[row["trainer/step"] for row in history(next(d.glob("*.wandb")))] for d in offline]
    assert logged == [[1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9, 10]]  # the W&B x-axis is the trainer's step
    for path in run.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
