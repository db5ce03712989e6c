"""Shared-memory batch reuse: the same batches as torch's collate, buffers reused only once handed back."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from launch.batches import SLOT_KEY, SharedBatches, release


class Samples(Dataset):
    def __init__(self, channels_last: bool = False) -> None:
        self.channels_last = channels_last

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        view = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
        if self.channels_last:  # as pixpro.augment's crops come out
            view = view[None].contiguous(memory_format=torch.channels_last)[0]
        return {"view": view, "coords": torch.rand(4, generator=g), "index": i, "weight": i / 4}


def stock(batch_size: int = 4) -> list[dict]:
    return list(DataLoader(Samples(), batch_size=batch_size))


def same(a: dict, b: dict) -> bool:
    keys = set(a) - {SLOT_KEY}
    return keys == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in keys)


def test_released_batches_are_the_stock_batches_and_reuse_the_slots():
    collate = SharedBatches(num_workers=2, slots_per_worker=3)
    loader = DataLoader(Samples(), batch_size=4, num_workers=2, collate_fn=collate)
    slots = []
    for got, want in zip(loader, stock(), strict=True):
        assert same(got, want)
        slots.append(int(got[SLOT_KEY][0]))
        release(loader, got)
    # every batch came from a slot (none fell back), and 10 batches went through 6 slots
    assert len(slots) == 10 and set(slots) <= set(range(6))
    assert int(collate.state.count_nonzero()) == 0


def test_channels_last_views_are_batched_channels_last_with_the_same_values():
    """A plain copy per view, not a transposing one; a layout only, the numbers are the stock batch's."""
    loader = DataLoader(
        Samples(channels_last=True), batch_size=4, num_workers=1, collate_fn=SharedBatches(1, 3)
    )
    for got, want in zip(loader, stock(), strict=True):
        assert same(got, want)
        assert (
            got["view"].is_contiguous(memory_format=torch.channels_last) and not got["view"].is_contiguous()
        )
        release(loader, got)
    planar = next(iter(DataLoader(Samples(), batch_size=4, num_workers=1, collate_fn=SharedBatches(1, 3))))
    assert planar["view"].is_contiguous()


def test_batches_never_handed_back_are_never_overwritten():
    """A consumer that keeps every batch: once a worker's slots are all out it collates the stock way."""
    collate = SharedBatches(num_workers=1, slots_per_worker=2)
    kept = list(DataLoader(Samples(), batch_size=4, num_workers=1, collate_fn=collate))
    assert [SLOT_KEY in b for b in kept] == [True, True] + [False] * 8
    assert all(same(got, want) for got, want in zip(kept, stock(), strict=True))


def test_a_stale_release_leaves_the_slot_to_its_new_batch():
    collate = SharedBatches(num_workers=1, slots_per_worker=1)
    collate.state[0] = 7  # slot 0 carries claim 7
    release(DataLoader(Samples(), collate_fn=collate), {SLOT_KEY: torch.tensor([0, 6])})
    assert int(collate.state[0]) == 7
    collate.release({SLOT_KEY: torch.tensor([0, 7])})
    assert int(collate.state[0]) == 0


def test_loading_in_the_main_process_is_stock_collation():
    collate = SharedBatches(num_workers=1, slots_per_worker=1)
    samples = [Samples()[i] for i in range(3)]
    assert same(collate(samples), default_collate(samples))


def test_more_workers_than_slots_were_made_for_collate_the_stock_way():
    collate = SharedBatches(num_workers=1, slots_per_worker=2)
    loader = DataLoader(Samples(), batch_size=4, num_workers=2, collate_fn=collate)
    got = list(loader)
    assert all(same(b, want) for b, want in zip(got, stock(), strict=True))
    assert sum(SLOT_KEY in b for b in got) == 2  # worker 0's two slots, never released; worker 1 has none
