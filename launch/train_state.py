"""What a checkpoint's ``train.pt`` holds, owned in one place (torchtitan's stateful-component style).

The trainer saves and restores through :class:`TrainState`; export and eval read a model out of the same
dictionary with :func:`model_weights`. On disk::

    {"spec_hash": <sha256 of the run spec>,
     "state": {"model", "optimizer", "scaler", "sampler", "progress": {"step", "epoch"},
               "schedule": {"total_steps", "warmup_steps", "peak_lr", "global_batch"}}}

A ``train.pt`` without a spec hash is refused: resuming it could silently train a different run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from launch.sampler import ResumableSampler
from pixpro.schedules import ema_momentum, learning_rate, scaled_lr
from schemas import RunSpec, SpecError, too_few_images


@dataclass
class Schedule:
    """The fixed numbers of the LR and EMA schedules, decided at the first start and kept across resumes
    (a resume on another world size keeps the global batch's schedule)."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    global_batch: int

    @classmethod
    def make(cls, spec: RunSpec, num_samples: int, world_size: int) -> Schedule:
        global_batch = spec.data.batch_size * world_size
        steps_per_epoch = num_samples // global_batch
        if steps_per_epoch == 0:
            raise SpecError(too_few_images(spec, num_samples, world_size))
        total = spec.optim.epochs * steps_per_epoch
        if spec.optim.max_steps is not None:
            total = min(total, spec.optim.max_steps)
        warmup = min(round(spec.optim.warmup_epochs * steps_per_epoch), total)
        peak = scaled_lr(spec.optim.base_lr, global_batch, spec.optim.lr_scaling)
        return cls(total, warmup, peak, global_batch)

    def lr(self, step: int, spec: RunSpec) -> float:
        return learning_rate(
            step,
            base_lr=self.peak_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            final_lr=spec.optim.final_lr,
        )

    def momentum(self, step: int, spec: RunSpec) -> float:
        return ema_momentum(step, total_steps=self.total_steps, base=spec.optim.ema_base_momentum)


class TrainState:
    """Every piece of rank 0's training state that a resume needs, with ``state_dict``/``load_state_dict``.

    Per-rank RNG streams live in each rank's own file (:mod:`launch.rng`), not here.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        sampler: ResumableSampler,
        schedule: Schedule,
        spec_hash: str,
    ) -> None:
        self.model, self.optimizer, self.scaler, self.sampler = model, optimizer, scaler, sampler
        self.schedule = schedule
        self.spec_hash = spec_hash
        self.step = 0
        self.epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "spec_hash": self.spec_hash,
            "state": {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "progress": {"step": self.step, "epoch": self.epoch},
                "sampler": self.sampler.state_dict(),
                "schedule": asdict(self.schedule),
            },
        }

    def load_state_dict(self, saved: dict[str, Any], where: str = "the checkpoint") -> None:
        """Restore everything; a different or missing spec hash is refused in one line (SpecError)."""
        check_spec_hash(saved, self.spec_hash, where)
        state = saved["state"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["progress"]["step"], state["progress"]["epoch"]
        self.sampler.load_state_dict(state["sampler"])
        self.schedule = Schedule(**state["schedule"])


def check_spec_hash(saved: Any, expected: str | None, where: str) -> str:
    """The spec hash a ``train.pt`` records (refusing one without, or with another than ``expected``)."""
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)):
        raise SpecError(f"{where} is not a pixpro train.pt (no 'state')")
    saved_hash = saved.get("spec_hash")
    if not isinstance(saved_hash, str) or not saved_hash:
        raise SpecError(f"{where} records no spec hash: refusing it (it could belong to any run)")
    if expected is not None and saved_hash != expected:
        raise SpecError(
            f"{where} was written by a different run spec (hash {saved_hash[:12]}, now {expected[:12]}); "
            "resuming would silently change the run. Start a new run instead"
        )
    return saved_hash


def model_weights(saved: Any, where: str) -> tuple[dict[str, torch.Tensor], int, str]:
    """(PixPro model state_dict, step, spec hash) of a ``train.pt``, for export and eval."""
    saved_hash = check_spec_hash(saved, None, where)
    state = saved["state"]
    return state["model"], int(state["progress"]["step"]), saved_hash
