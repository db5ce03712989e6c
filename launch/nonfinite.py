"""A step whose gradients are not finite is not applied, decided on the device (no host sync per step).

A diverging run turns its loss and gradients into inf/NaN; one such update poisons the weights, the
momentum buffers and (already in the forward) the BatchNorm running statistics, and every checkpoint
after it. Torch's GradScaler skips such a step for fp16 by reading a flag on the host every step; here,
for any precision, the step is taken and then undone on the device where the gradients were not finite:
the state it may touch (online and EMA parameters, optimizer buffers, module buffers) is copied before
the step and selected back with ``torch.where`` after the optimizer (the only select that a NaN cannot
leak through). On a ResNet-50 PixPro that is ~0.4 GB copied and selected per step, under a millisecond
on an H100 against a step of ~100 ms. The decision uses the gradients after DDP's all-reduce, identical on
every rank, so every rank skips the same steps (fp16 decides on the loss, agreed over the ranks).

The count of consecutive skipped steps stays on the device; the trainer reads it with the loss (every
``log_every_steps`` and before each checkpoint) and stops the run as diverged at
``optim.max_nonfinite_steps`` in a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A device bool: no inf or NaN in ``tensors``, in two kernels (the 2-norms, then one reduction). A
    tensor whose 2-norm overflows float32 (values past ~1e19) counts as not finite too: a state that far
    gone has diverged all the same (the max-norm, which would not overflow, is 50x slower on a CPU)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(list(tensors)))).all()


class Diverged(RuntimeError):
    """The run cannot go on: too many steps in a row were not finite, or the state itself is not."""


class NonFiniteGuard:
    """Undo, on the device, each step whose gradients (or loss) are not finite; count them."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model, self.optimizer = model, optimizer
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.run = zero.clone()  # consecutive skipped steps up to now
        self.longest = zero.clone()  # the longest run since the last read
        self.skipped = zero.clone()  # skipped steps in this attempt
        self.scaler_skipped = zero.clone()  # fp16: steps GradScaler skipped (inf gradients) in this attempt
        self._tensors: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def _state(self) -> list[torch.Tensor]:
        """Everything a step writes: parameters (the EMA branch's too), module buffers (BN statistics)
        and the optimizer's buffers."""
        params = list(self.model.parameters())
        opt = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [*params, *self.model.buffers(), *opt]

    @torch.no_grad()
    def begin(self) -> None:
        """Before the step (the EMA update included): keep a copy of what it may change."""
        tensors = self._state()
        if len(tensors) != len(self._tensors) or any(
            a is not b for a, b in zip(tensors, self._tensors, strict=True)
        ):
            self._tensors, self._saved = tensors, [t.clone() for t in tensors]
        else:
            torch._foreach_copy_(self._saved, self._tensors)

    @torch.no_grad()
    def finish(
        self,
        loss: torch.Tensor,
        grads_checked: bool = True,
        every_rank: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """After the optimizer: undo the step unless its gradients and the state it made are finite;
        returns the device flag ``ok``. A non-finite loss makes non-finite gradients;
        ``grads_checked=False`` (fp16, whose GradScaler skips steps with inf gradients itself, as
        expected) looks at the ``loss`` instead, and counts GradScaler's skips apart. The loss is this
        rank's own: ``every_rank`` (a device all-reduce, MIN) makes one rank's non-finite loss every
        rank's verdict, or that rank alone would undo its EMA and BN statistics and drift from the rest."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads_checked and grads:  # reduced over the ranks by DDP: the same verdict on every rank
            ok = all_finite(grads)
        else:
            ok = torch.isfinite(loss.detach()).all()
            if every_rank is not None:
                ok = every_rank(ok)
            if grads:  # inf gradients: GradScaler did not step (and lowers its scale)
                self.scaler_skipped.add_((~all_finite(grads)).to(self.scaler_skipped.dtype))
        state = self._state()  # once per step: the hot path
        # finite gradients can still step a weight, or a BN statistic, past float's range
        ok = ok & all_finite([t for t in state if t.is_floating_point()])
        for now, before in zip(self._tensors, self._saved, strict=True):
            torch.where(ok, now, before, out=now)
        known = {id(t) for t in self._tensors}
        for new in state:  # made by the optimizer in this step (its first): as if never made
            if id(new) not in known:
                new.masked_fill_(~ok, 0)
        bad = (~ok).to(self.run.dtype)
        self.run.add_(1).mul_(bad)  # +1 on a bad step, 0 on a good one
        torch.maximum(self.longest, self.run, out=self.longest)
        self.skipped.add_(bad)
        return ok

    def state_finite(self) -> bool:
        """Every floating tensor a step writes is finite (one host sync: the trainer asks at saves)."""
        return bool(all_finite([t for t in self._state() if t.is_floating_point()]))

    def counters(self) -> torch.Tensor:
        """``[longest run since the last read, skipped in the attempt, GradScaler's skips in the attempt]``
        on the device; the trainer reads them with the loss (one host sync), then calls :meth:`mark_read`."""
        return torch.stack([self.longest, self.skipped, self.scaler_skipped])

    def mark_read(self) -> None:
        self.longest.copy_(self.run)
