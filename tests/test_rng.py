"""capture_rng/restore_rng: every generator comes back, through a weights_only checkpoint."""

from __future__ import annotations

import io
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from launch.rng import capture_rng, restore_rng


def draw() -> dict:
    """Consume every generator, including the cached-gaussian paths of python and numpy."""
    out = {
        "python": [random.random(), random.gauss(0.0, 1.0), random.getrandbits(64)],
        "numpy": [np.random.rand(3).tolist(), np.random.randn(3).tolist(), int(np.random.randint(1 << 30))],
        "torch": [torch.rand(4), torch.randn(3), torch.randint(0, 1 << 30, (2,))],
    }
    if torch.cuda.is_available():
        out["cuda"] = [torch.rand(4, device=f"cuda:{d}").cpu() for d in range(torch.cuda.device_count())]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert a["python"] == b["python"]
    assert a["numpy"] == b["numpy"]
    for x, y in zip(a["torch"], b["torch"], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a.get("cuda", []), b.get("cuda", []), strict=True):
        assert torch.equal(x, y)


def weights_only_roundtrip(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_capture_draw_restore_draw_is_identical() -> None:
    seed_all(7)
    draw()  # leave all generators mid-stream, with cached gaussians pending
    state = capture_rng()
    first = draw()
    draw()
    restore_rng(state)
    assert_same(draw(), first)


def test_state_survives_weights_only_load() -> None:
    seed_all(11)
    random.gauss(0.0, 1.0)  # gauss_next is now a float, not None
    np.random.randn()  # numpy has_gauss is now 1
    state = capture_rng()
    assert state["python"]["gauss_next"] is not None
    assert state["numpy"]["has_gauss"] == 1
    loaded = weights_only_roundtrip(state)
    first = draw()
    seed_all(12)  # scramble, then restore from the loaded copy
    restore_rng(loaded)
    assert_same(draw(), first)


def test_state_holds_no_numpy_objects() -> None:
    """weights_only rejects numpy types; checking the leaves explains a failure better than the load."""

    def leaves(x: object):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, list | tuple):
            for v in x:
                yield from leaves(v)
        else:
            yield x

    for leaf in leaves(capture_rng()):
        assert leaf is None or type(leaf) in (int, float, torch.Tensor), type(leaf)


def test_restore_leaves_python_random_at_exact_position() -> None:
    seed_all(3)
    state = capture_rng()
    expected = random.getstate()
    random.random()
    restore_rng(weights_only_roundtrip(state))
    assert random.getstate() == expected
    np_expected = np.random.get_state()
    np.random.rand()
    restore_rng(state)
    got = np.random.get_state()
    assert np.array_equal(got[1], np_expected[1]) and got[2:] == np_expected[2:]


class FakeCuda:
    """``n`` CUDA devices with one RNG state each, the current one set as the trainer sets it: a resume
    across GPU layouts, simulated on a CPU machine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int, current: int) -> None:
        self.states = {d: torch.full((16,), d, dtype=torch.uint8) for d in range(n)}
        self.current = current
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(
            torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.current].clone()
        )
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[d] for d in range(n)])

        def set_state(state: torch.Tensor, device: int | str = "cuda") -> None:
            self.states[self.current if isinstance(device, str) else device] = state.clone()

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)


def test_a_rank_resumes_on_another_gpu_layout_with_its_own_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same world size, other layout: rank 5 trained on local GPU 5 of an 8-GPU node and resumes on
    local GPU 1 of a 4-GPU node. Its one saved CUDA stream goes to the device it now trains on."""
    saved = FakeCuda(monkeypatch, n=8, current=5)
    saved.states[5] = torch.arange(16, dtype=torch.uint8)  # rank 5's stream, mid-way
    state = weights_only_roundtrip(capture_rng())
    assert len(state["cuda"]) == 1  # this process's device only, not all eight
    resumed = FakeCuda(monkeypatch, n=4, current=1)
    restore_rng(state)
    assert torch.equal(resumed.states[1], torch.arange(16, dtype=torch.uint8))
    assert all(torch.equal(resumed.states[d], torch.full((16,), d, dtype=torch.uint8)) for d in (0, 2, 3))


def test_a_state_of_every_visible_device_restores_the_current_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The former format (one state per visible device) still resumes: the current device's entry."""
    fake = FakeCuda(monkeypatch, n=2, current=1)
    state = {
        **capture_rng(),
        "cuda": [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)],
    }
    restore_rng(state)
    assert torch.equal(fake.states[1], torch.full((16,), 9, dtype=torch.uint8))


def test_cuda_presence_mismatch_is_refused_unless_not_strict() -> None:
    assert not torch.cuda.is_available()  # the CPU suite: a GPU checkpoint on a CPU machine
    other = {**capture_rng(), "cuda": [torch.zeros(16, dtype=torch.uint8)]}
    with pytest.raises(ValueError, match="CUDA"):
        restore_rng(other)
    seed_all(5)
    first = draw()
    seed_all(5)
    state = capture_rng()
    restore_rng({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]}, strict=False)
    assert_same(draw(), first)


@pytest.mark.slow
def test_lazy_s3_imports_after_seeding_leave_the_python_rng_alone() -> None:
    """aiobotocore imports httpx when installed (wandb brings it), httpx imports rich, and rich draws from
    the process-wide ``random`` at import: the trainer imports rich first, so the first S3 call after
    seeding cannot shift the RNG a checkpoint saves."""
    code = (
        "import random, launch.train\n"
        "random.seed(0); before = random.getstate()\n"
        "import aiobotocore.endpoint, s3fs\n"
        "assert random.getstate() == before, 'an import drew from the global random'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
