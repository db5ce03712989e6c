"""Deterministic, resumable, world-size-independent distributed data order.

The order of an epoch is a function of ``(seed, epoch)`` only, and the position inside it is
kept as one *global* count of consumed samples. Resuming is then a pure index computation
(nothing is loaded to skip ahead), and because the position does not depend on how many
ranks consumed it, a run may resume on a different world size and still see every remaining
sample of the epoch exactly once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "epoch_permutation"]


def _epoch_seed(seed: int, epoch: int) -> int:
    """Mix (seed, epoch) into a 63-bit generator seed.

    A hash (rather than ``seed + epoch``) keeps (seed=1, epoch=0) and (seed=0, epoch=1)
    from sharing an order.
    """
    digest = hashlib.sha256(f"pixpro-sampler/{int(seed)}/{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """Global permutation of one epoch; uses a private generator so the global RNG is untouched."""
    gen = torch.Generator()
    gen.manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=gen)


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for this rank's share of the rest of the current epoch.

    Layout: the remaining samples ``P[consumed:]`` are cut into global batches of
    ``world_size * batch_size``; in each global batch rank ``r`` takes the contiguous slice
    ``[r * batch_size, (r + 1) * batch_size)``, so a ``DataLoader(batch_size=batch_size)``
    over this sampler gives rank ``r`` exactly its slice of every global step.

    Tail: with ``drop_last`` a trailing partial global batch is dropped, so every rank runs
    the same number of steps (required by DDP collectives). Without ``drop_last`` the tail of
    ``t`` samples is split as evenly as possible in rank order (rank ``r`` gets ``t // W`` plus
    one if ``r < t % W``), so each rank's last batch is partial and, when ``t < W``, the
    higher ranks get no tail batch at all: ranks may then differ by one step.

    State (``epoch``, ``consumed``) is global: the trainer advances it after every optimizer
    step by ``world_size * batch_size`` samples (``advance_steps(1)``). Iterating never
    changes it, so an iterator opened before a checkpoint does not affect what is saved.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        drop_last: bool = True,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if world_size <= 0:
            raise ValueError(f"world_size must be positive, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.consumed = 0
        self._cache: tuple[int, torch.Tensor] | None = None

    @property
    def global_batch_size(self) -> int:
        """Samples consumed by all ranks together in one optimizer step."""
        return self.world_size * self.batch_size

    def permutation(self) -> torch.Tensor:
        """The current epoch's global order (cached: randperm of a large dataset is not free)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, epoch_permutation(self.num_samples, self.seed, self.epoch))
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first sample."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)
        self.consumed = 0

    def advance(self, n_samples: int) -> None:
        """Record ``n_samples`` more samples consumed by all ranks together.

        Clamped at the end of the epoch so that advancing by a full global batch after a
        partial tail step (``drop_last=False``) is harmless.
        """
        if n_samples < 0:
            raise ValueError(f"cannot advance by a negative count ({n_samples})")
        self.consumed = min(self.consumed + int(n_samples), self.num_samples)

    def advance_steps(self, k: int = 1) -> None:
        """Record ``k`` optimizer steps, each consuming one global batch."""
        if k < 0:
            raise ValueError(f"cannot advance by a negative number of steps ({k})")
        self.advance(k * self.global_batch_size)

    def _rank_counts(self, remaining: int) -> tuple[int, int]:
        """(full batches, tail size) this rank gets from ``remaining`` global samples."""
        full, tail = divmod(remaining, self.global_batch_size)
        if self.drop_last:
            return full, 0
        base, extra = divmod(tail, self.world_size)
        return full, base + (1 if self.rank < extra else 0)

    def _steps(self, remaining: int) -> int:
        full, tail = self._rank_counts(remaining)
        return full + (1 if tail else 0)

    def steps_remaining(self) -> int:
        """This rank's batches left in the epoch; depends on world size (and on rank without drop_last)."""
        return self._steps(self.num_samples - self.consumed)

    def steps_per_epoch(self) -> int:
        """This rank's batches in a whole epoch (from ``consumed=0``); depends on world size."""
        return self._steps(self.num_samples)

    def __len__(self) -> int:
        """Samples this rank will still yield in the epoch, so ``len(DataLoader)`` is right."""
        full, tail = self._rank_counts(self.num_samples - self.consumed)
        return full * self.batch_size + tail

    def rank_indices(self) -> torch.Tensor:
        """This rank's remaining dataset indices in iteration order (no data is touched)."""
        rest = self.permutation()[self.consumed :]
        gbs, bs, r = self.global_batch_size, self.batch_size, self.rank
        full, tail = divmod(rest.numel(), gbs)
        parts = [rest[: full * gbs].view(full, gbs)[:, r * bs : (r + 1) * bs].reshape(-1)]
        if not self.drop_last and tail:
            base, extra = divmod(tail, self.world_size)
            start = full * gbs + r * base + min(r, extra)
            parts.append(rest[start : start + base + (1 if r < extra else 0)])
        return torch.cat(parts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.rank_indices().tolist():
            yield epoch, index

    def state_dict(self) -> dict[str, int]:
        """Global position only: rank and world size belong to the run that loads it."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the position; refuse a state from a different dataset size or seed.

        The world size may differ from the saving run: the remaining samples are
        repartitioned over this sampler's ranks.
        """
        missing = {"seed", "epoch", "consumed", "num_samples"} - set(state)
        if missing:
            raise ValueError(f"sampler state is missing {sorted(missing)}")
        num_samples, seed = int(state["num_samples"]), int(state["seed"])
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if num_samples != self.num_samples:
            raise ValueError(
                f"sampler state is for num_samples={num_samples}, but this dataset has "
                f"{self.num_samples}: resuming would silently change the data order"
            )
        if seed != self.seed:
            raise ValueError(
                f"sampler state has seed={seed}, but this run uses seed={self.seed}: "
                "resuming would silently change the data order"
            )
        if epoch < 0:
            raise ValueError(f"sampler state has a negative epoch ({epoch})")
        if not 0 <= consumed <= num_samples:
            raise ValueError(f"sampler state has consumed={consumed} outside [0, {num_samples}]")
        self.epoch = epoch
        self.consumed = consumed
