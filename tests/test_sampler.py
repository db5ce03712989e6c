"""ResumableSampler: deterministic order, exact resume, world-size changes, DataLoader use."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from launch.sampler import ResumableSampler, epoch_permutation

SEED = 1234


def make(n: int, ws: int, bs: int, rank: int = 0, drop_last: bool = True, seed: int = SEED):
    return ResumableSampler(n, seed=seed, rank=rank, world_size=ws, batch_size=bs, drop_last=drop_last)


def batches(sampler: ResumableSampler) -> list[list[int]]:
    """This rank's remaining batches as index lists, checking every epoch tag on the way."""
    items = list(sampler)
    assert all(e == sampler.epoch for e, _ in items)
    idx = [i for _, i in items]
    return [idx[i : i + sampler.batch_size] for i in range(0, len(idx), sampler.batch_size)]


def run_segment(
    n: int, ws: int, bs: int, state: dict | None, steps: int | None, drop_last: bool = True
) -> tuple[list[list[list[int]]], dict]:
    """Drive ``ws`` ranks like the trainer: ``steps`` optimizer steps (None: to epoch end).

    Returns the per-step per-rank batches and the saved state (through a weights_only round trip).
    """
    samplers = [make(n, ws, bs, r, drop_last) for r in range(ws)]
    if state is not None:
        for s in samplers:
            s.load_state_dict(state)
    per_rank = [batches(s) for s in samplers]
    total = max(len(b) for b in per_rank)
    steps = total if steps is None else min(steps, total)
    done = [[b[i] if i < len(b) else [] for b in per_rank] for i in range(steps)]
    for s in samplers:
        s.advance_steps(steps)
    assert all(s.state_dict() == samplers[0].state_dict() for s in samplers)
    buf = io.BytesIO()
    torch.save(samplers[0].state_dict(), buf)
    buf.seek(0)
    return done, torch.load(buf, weights_only=True)


def flat(steps: list[list[list[int]]]) -> list[int]:
    return [i for step in steps for b in step for i in b]


CONFIGS = [(100, 2, 8), (100, 3, 7), (64, 4, 4), (10, 4, 3), (5, 4, 2), (97, 1, 10), (33, 5, 1)]


def test_permutation_depends_only_on_seed_and_epoch() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = make(50, 2, 4, rank=0)
    b = make(50, 3, 5, rank=2, drop_last=False)
    torch.manual_seed(99)  # the global RNG must not matter
    assert torch.equal(a.permutation(), b.permutation())
    assert torch.equal(a.permutation(), epoch_permutation(50, SEED, 0))
    assert sorted(a.permutation().tolist()) == list(range(50))
    assert not torch.equal(epoch_permutation(50, SEED, 0), epoch_permutation(50, SEED + 1, 0))
    assert not torch.equal(epoch_permutation(50, SEED, 0), epoch_permutation(50, SEED, 1))
    # (seed, epoch) is mixed, not added.
    assert not torch.equal(epoch_permutation(50, 1, 0), epoch_permutation(50, 0, 1))
    torch.manual_seed(0)
    epoch_permutation(50, SEED, 3)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(("n", "ws", "bs"), CONFIGS)
def test_union_over_ranks_without_drop_last_is_each_index_once(n: int, ws: int, bs: int) -> None:
    samplers = [make(n, ws, bs, r, drop_last=False) for r in range(ws)]
    counts = Counter(i for s in samplers for _, i in s)
    assert counts == Counter(range(n))
    assert sum(len(s) for s in samplers) == n
    steps = [s.steps_per_epoch() for s in samplers]
    assert max(steps) - min(steps) <= 1
    assert all(len(batches(s)) == s.steps_remaining() for s in samplers)
    assert all(len(b) <= bs for s in samplers for b in batches(s))


@pytest.mark.parametrize(("n", "ws", "bs"), CONFIGS)
def test_union_over_ranks_with_drop_last_misses_only_the_tail(n: int, ws: int, bs: int) -> None:
    samplers = [make(n, ws, bs, r) for r in range(ws)]
    seen = [i for s in samplers for _, i in s]
    gbs = ws * bs
    assert len(seen) == len(set(seen)) == n - n % gbs
    tail = set(samplers[0].permutation()[n - n % gbs :].tolist())
    assert set(range(n)) - set(seen) == tail
    assert len({s.steps_per_epoch() for s in samplers}) == 1
    assert samplers[0].steps_per_epoch() == n // gbs
    assert all(len(b) == bs for s in samplers for b in batches(s))


def test_rank_takes_contiguous_slice_of_each_global_batch() -> None:
    n, ws, bs = 40, 3, 4
    perm = epoch_permutation(n, SEED, 0).tolist()
    for r in range(ws):
        got = batches(make(n, ws, bs, r))
        assert got == [perm[g * 12 + r * bs : g * 12 + (r + 1) * bs] for g in range(n // 12)]


def test_tail_split_evenly_without_drop_last() -> None:
    # 3 + 2*2*2 = 11 samples: after one full global step the 3-sample tail goes 2/1 to ranks 0/1.
    n, ws, bs = 11, 2, 4
    perm = epoch_permutation(n, SEED, 0).tolist()
    b0, b1 = batches(make(n, ws, bs, 0, False)), batches(make(n, ws, bs, 1, False))
    assert b0 == [perm[0:4], perm[8:10]]
    assert b1 == [perm[4:8], perm[10:11]]
    # With fewer tail samples than ranks the higher ranks get no tail batch: one step fewer.
    s = [make(9, 4, 2, r, False) for r in range(4)]
    assert [x.steps_per_epoch() for x in s] == [2, 1, 1, 1]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize(("n", "ws", "bs"), [(100, 2, 8), (53, 3, 4), (20, 1, 3)])
def test_resume_gives_exact_suffix_per_rank(n: int, ws: int, bs: int, drop_last: bool) -> None:
    full = [batches(make(n, ws, bs, r, drop_last)) for r in range(ws)]
    for k in range(max(len(b) for b in full) + 1):
        _, state = run_segment(n, ws, bs, None, k, drop_last)
        assert state["consumed"] == min(k * ws * bs, n)
        for r in range(ws):
            resumed = make(n, ws, bs, r, drop_last)
            resumed.load_state_dict(state)
            assert batches(resumed) == full[r][k:]
            assert resumed.steps_remaining() == len(full[r][k:])


def test_advance_in_samples_matches_advance_in_steps() -> None:
    a, b = make(100, 2, 8), make(100, 2, 8)
    a.advance_steps(3)
    b.advance(16)
    b.advance(32)
    assert a.state_dict() == b.state_dict()
    assert list(a) == list(b)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize(("ws_before", "ws_after"), [(2, 1), (2, 3), (3, 2), (1, 4)])
def test_world_size_change_mid_epoch_sees_remaining_once(
    ws_before: int, ws_after: int, drop_last: bool
) -> None:
    n, bs = 101, 4
    before, state = run_segment(n, ws_before, bs, None, 5, drop_last)
    after, end = run_segment(n, ws_after, bs, state, None, drop_last)
    seen = flat(before) + flat(after)
    assert len(seen) == len(set(seen))
    perm = epoch_permutation(n, SEED, 0).tolist()
    consumed = 5 * ws_before * bs
    assert flat(before) and set(flat(before)) == set(perm[:consumed])
    remaining = n - consumed
    expect_after = remaining if not drop_last else remaining - remaining % (ws_after * bs)
    assert set(flat(after)) == set(perm[consumed : consumed + expect_after])
    if not drop_last:
        assert sorted(seen) == list(range(n))
        assert end["consumed"] == n


def test_three_segments_across_an_epoch_boundary() -> None:
    """A resumed run resumed again (2 -> 3 -> 1 ranks) continues, also into the next epoch."""
    n, bs = 60, 3
    seg1, state = run_segment(n, 2, bs, None, 4)
    seg2, state = run_segment(n, 3, bs, state, 2)
    seg3, state = run_segment(n, 1, bs, state, None)
    seen = flat(seg1) + flat(seg2) + flat(seg3)
    assert sorted(seen) == list(range(n))  # 24 + 18 + 18: no tail to drop
    assert seen == epoch_permutation(n, SEED, 0).tolist()  # order is global, so unchanged
    s = make(n, 2, bs)
    s.load_state_dict(state)
    assert s.steps_remaining() == 0 and list(s) == []
    s.set_epoch(state["epoch"] + 1)
    following = make(n, 2, bs)
    following.set_epoch(1)
    assert list(s) == list(following)


def test_set_epoch_changes_order_and_resets_position() -> None:
    s = make(64, 2, 4)
    first = list(s)
    s.advance_steps(3)
    s.set_epoch(1)
    assert s.consumed == 0 and s.epoch == 1
    second = list(s)
    assert all(e == 1 for e, _ in second)
    assert [i for _, i in first] != [i for _, i in second]
    assert len(second) == len(first)
    s.set_epoch(0)
    assert list(s) == first


class EpochIndexDataset(Dataset):
    """Returns its (epoch, index) key so batches show exactly what the sampler chose."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        self.loads += 1
        epoch, index = key
        assert 0 <= index < self.n
        return torch.tensor([epoch, index])


@pytest.mark.parametrize("drop_last", [True, False])
def test_dataloader_batches_identical_for_0_and_2_workers(drop_last: bool) -> None:
    n, ws, bs = 45, 2, 4
    for r in range(ws):
        s = make(n, ws, bs, r, drop_last)
        s.set_epoch(2)
        s.advance_steps(2)
        expected = batches(s)
        got = {}
        for workers in (0, 2):
            loader = DataLoader(EpochIndexDataset(n), batch_size=bs, sampler=s, num_workers=workers)
            got[workers] = [b.tolist() for b in loader]
            assert len(loader) == len(expected)
        assert got[0] == got[2]
        assert [[i for _, i in b] for b in got[0]] == expected
        assert all(e == 2 for b in got[0] for e, _ in b)


def test_resuming_loads_only_remaining_samples() -> None:
    n, ws, bs = 80, 2, 5
    ds = EpochIndexDataset(n)
    s = make(n, ws, bs, rank=1)
    s.load_state_dict({"seed": SEED, "epoch": 0, "consumed": 60, "num_samples": n})
    assert len(list(DataLoader(ds, batch_size=bs, sampler=s))) == 2
    assert ds.loads == len(s) == 10


def test_load_state_dict_refuses_other_run() -> None:
    s = make(100, 2, 8)
    good = s.state_dict()
    with pytest.raises(ValueError, match="num_samples"):
        s.load_state_dict({**good, "num_samples": 99})
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({**good, "seed": SEED + 1})
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"seed": SEED, "epoch": 0})
    with pytest.raises(ValueError, match="consumed"):
        s.load_state_dict({**good, "consumed": 101})
    s.load_state_dict({**good, "epoch": 3, "consumed": 17})
    assert s.state_dict() == {"seed": SEED, "epoch": 3, "consumed": 17, "num_samples": 100}


def test_state_is_global_not_per_rank() -> None:
    a, b = make(100, 2, 8, rank=0), make(100, 4, 2, rank=3, drop_last=False)
    a.advance_steps(2)
    b.advance(32)
    assert a.state_dict() == b.state_dict()
    assert set(a.state_dict()) == {"seed", "epoch", "consumed", "num_samples"}


def test_advance_clamps_at_epoch_end_and_rejects_negative() -> None:
    s = make(10, 2, 4, drop_last=False)
    assert s.steps_remaining() == 2
    s.advance_steps(2)  # the second step only had 2 samples
    assert s.consumed == 10 and s.steps_remaining() == 0 and list(s) == []
    with pytest.raises(ValueError):
        s.advance(-1)
    with pytest.raises(ValueError):
        s.advance_steps(-1)


def test_steps_depend_on_world_size() -> None:
    assert make(100, 1, 10).steps_per_epoch() == 10
    assert make(100, 2, 10).steps_per_epoch() == 5
    assert make(100, 3, 10).steps_per_epoch() == 3
    assert make(100, 3, 10, drop_last=False).steps_per_epoch() == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_samples": 0},
        {"world_size": 0},
        {"rank": 2},
        {"rank": -1},
        {"batch_size": 0},
    ],
)
def test_constructor_validates(kwargs: dict) -> None:
    args = {"num_samples": 10, "seed": 0, "rank": 0, "world_size": 2, "batch_size": 2, **kwargs}
    n = args.pop("num_samples")
    with pytest.raises(ValueError):
        ResumableSampler(n, **args)
