"""Rank 0's metric mirrors: TensorBoard event files in the run folder and an optional W&B run.

The JSON-lines metrics beside the checkpoints stay the record ``pixpro status`` and ``pixpro plot`` read;
these mirror them into the tools researchers already watch. Every sink runs on one background thread fed
by a bounded queue, so a slow disk, a hung W&B service or a sink that raises never stalls or stops a
training step: a full queue drops records, and a failing sink logs one warning and is dropped.

Continuity across preemptions: a resumed attempt repeats the steps after its checkpoint. Each attempt
writes its own TensorBoard event file whose first event purges (``purge_step``) every step from its first
logged step on, so TensorBoard's reader keeps exactly one value per step, the latest attempt's. W&B gets
the trainer's step as its x-axis (``trainer/step``; W&B's own ``_step`` only counts calls), and its run
id is derived from the pixpro run id, so every attempt resumes the same W&B run.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from schemas import RunSpec
from schemas.contract import RunPaths, wandb_run_id

log = logging.getLogger(__name__)

QUEUE_RECORDS = 10_000
"""Records a stalled sink may fall behind before new ones are dropped (a few hours at 1 record/s)."""
CLOSE_TIMEOUT_S = 10.0
"""What a stalled sink may add to an attempt's exit (a preempted one has the signal's lead time left)."""

SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "ema_momentum": "train/ema_momentum",
    "img_per_s": "train/img_per_s",
    "positives": "train/positives_per_image",
    "commit_s": "checkpoint/commit_s",
    "data_skips": "data/skips",
    "skipped_steps": "train/skipped_steps",
    "scaler_skipped_steps": "train/scaler_skipped_steps",
}
"""Metrics record field -> the tag TensorBoard and W&B show it under (absent fields are left out)."""

KNN_SCALARS = {"knn_top1": "monitor/knn_top1", "knn_top5": "monitor/knn_top5"}
"""The kNN monitor's fields: plotted at the step they were measured only (later records carry them on)."""

STEP_KEY = "trainer/step"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The plotted values of one metrics record, by tag."""
    fields = SCALARS | (KNN_SCALARS if record.get("knn_step") == record.get("step") else {})
    return {tag: float(record[k]) for k, tag in fields.items() if record.get(k) is not None}


class Sink(Protocol):
    def write(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """One event file per attempt in ``log_dir``; its first event purges the steps this attempt repeats."""

    def __init__(self, log_dir: Path, first_step: int, attempt: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=first_step, filename_suffix=f".{attempt}")

    def write(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # on this thread: a preempted attempt loses at most the record in flight

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run resumed by every attempt (``resume="allow"``); the API key only from the environment."""

    def __init__(self, spec: RunSpec, run_id: str, run_dir: Path) -> None:
        import wandb

        cfg = spec.logging.wandb
        assert cfg is not None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            group=cfg.group,
            tags=list(cfg.tags),
            id=wandb_run_id(run_id),
            name=run_id,
            resume="allow",
            dir=str(run_dir),
            config=spec.model_dump(mode="json"),  # the spec refuses credentials, so none can leak here
            settings=wandb.Settings(console="off"),  # the trainer's output has its own per-rank logs
        )
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, STEP_KEY: step})

    def close(self) -> None:
        self.run.finish()


def run_id_of(run_dir: Path) -> str:
    """The pixpro run id: the CLI's run record in the run folder, else the folder's name."""
    try:
        return str(json.loads(RunPaths(run_dir).record.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return run_dir.resolve().name


SinkFactory = Callable[[int], Sink]
"""Builds a sink on the writer thread, given the first step it will be handed."""


def sink_factories(spec: RunSpec, run_dir: Path, attempt: str) -> dict[str, SinkFactory]:
    """The sinks the spec asks for, by name."""
    out: dict[str, SinkFactory] = {}
    if spec.logging.tensorboard:
        out["tensorboard"] = lambda first: TensorBoardSink(RunPaths(run_dir).tensorboard, first, attempt)
    wb = spec.logging.wandb
    if wb is not None and wb.mode != "disabled":
        out["wandb"] = lambda first: WandbSink(spec, run_id_of(run_dir), run_dir)
    return out


class MetricSinks:
    """Fans records out to the sinks on one daemon thread; ``write`` never blocks."""

    def __init__(self, factories: dict[str, SinkFactory]) -> None:
        self._factories = factories
        self._queue: queue.Queue[tuple[int, dict[str, float]] | None] = queue.Queue(QUEUE_RECORDS)
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="metric-sinks", daemon=True)
        if factories:
            self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        if not self._factories:
            return
        try:
            self._queue.put_nowait((int(record["step"]), scalars(record)))
        except queue.Full:
            if self._dropped == 0:
                log.warning("metric sinks are behind by %d records: dropping new ones", QUEUE_RECORDS)
            self._dropped += 1

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued and close the sinks, waiting at most ``timeout_s``."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _run(self) -> None:
        sinks: dict[str, Sink] = {}
        failed: set[str] = set()
        while (item := self._queue.get()) is not None:
            step, values = item
            for name, factory in self._factories.items():
                if name in failed:
                    continue
                try:
                    if name not in sinks:
                        sinks[name] = factory(step)
                    sinks[name].write(step, values)
                except Exception as exc:  # any sink's failure: warn once, drop it, train on
                    self._failed(name, exc, failed)
                    sinks.pop(name, None)
        for name, sink in sinks.items():
            try:
                sink.close()
            except Exception as exc:
                self._failed(name, exc, failed)

    @staticmethod
    def _failed(name: str, exc: Exception, failed: set[str]) -> None:
        log.warning("%s logging failed, off for this attempt: %s: %s", name, type(exc).__name__, exc)
        failed.add(name)
