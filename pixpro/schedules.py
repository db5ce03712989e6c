"""Learning-rate and EMA-momentum schedules as pure functions of the optimizer step.

Being stateless, they resume exactly from the saved step count (the official code restarts the EMA
schedule at 0.99 on resume because its counter is never saved).
"""

from __future__ import annotations

import math
from typing import Literal


def learning_rate(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float = 0.01,
    final_lr: float = 1e-6,
) -> float:
    """Linear warmup from ``base_lr * warmup_start_factor`` at step 0 to ``base_lr`` at ``warmup_steps``,
    then cosine decay to ``final_lr`` at ``total_steps`` (held there afterwards)."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps, total > 0; got {warmup_steps}, {total_steps}"
        )
    step = max(step, 0)
    if step < warmup_steps:
        return base_lr * (warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + (base_lr - final_lr) * (1 + math.cos(math.pi * progress)) / 2


def ema_momentum(step: int, *, total_steps: int, base: float = 0.99) -> float:
    """BYOL's target momentum ``1 - (1 - base) (cos(pi k / K) + 1) / 2``: ``base`` at 0, 1 at ``K``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def scaled_lr(base_per_256: float, global_batch: int, rule: Literal["linear", "sqrt"] = "linear") -> float:
    """Scale a per-256-images LR to the global batch; ``sqrt`` is advised for small batches."""
    if rule == "linear":
        return base_per_256 * global_batch / 256
    if rule == "sqrt":
        return base_per_256 * math.sqrt(global_batch / 256)
    raise ValueError(f"unknown LR scaling rule {rule!r}; use 'linear' or 'sqrt'")
