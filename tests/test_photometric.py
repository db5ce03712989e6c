"""The photometric steps: torchvision's results up to one grey level, and one answer whatever the batch,
so views finished on the training device equal views finished in a DataLoader worker."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pixpro import photometric as P
from pixpro.augment import TwoCrops, TwoViews, TwoViewTransform
from pixpro.data import sample_generator


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 1, size: int = 64, seed: int = 1) -> torch.Tensor:
    x = torch.randint(0, 256, (n, 3, size, size), generator=gen(seed), dtype=torch.uint8)
    x[:, :, :8] = x[:, :1, :8]  # greys
    x[:, 1, 8:16] = x[:, 0, 8:16]  # ties between channels
    x[:, 2, 16:24] = x[:, 1, 16:24]
    return x


def close_to_torchvision(ours: torch.Tensor, theirs: torch.Tensor, share: float = 2e-3) -> None:
    """At most one grey level apart, on at most ``share`` of the values."""
    diff = (ours.int() - theirs.int()).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() < share


def f(value: float) -> torch.Tensor:
    return torch.tensor([value]).view(1, 1, 1, 1)


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.4])
def test_jitter_steps_match_torchvision(factor):
    x = images()
    close_to_torchvision(P.brightness(x.float(), f(factor)), TF.adjust_brightness(x, factor))
    close_to_torchvision(P.contrast(x.float(), f(factor)), TF.adjust_contrast(x, factor))
    # a blend truncates to uint8, so values that land on a whole number fall either side of it: up to
    # ~6 % of them differ between any two roundings (torchvision's fused multiply-add, ours, exact maths)
    close_to_torchvision(P.saturation(x.float(), f(factor)), TF.adjust_saturation(x, factor), share=0.08)


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.03, 0.0, 0.05, 0.1, 0.5])
def test_hue_matches_torchvision(factor):
    x = images()
    close_to_torchvision(P.hue(x.float(), f(factor)), TF.adjust_hue(x, factor))


@pytest.mark.parametrize("factor", [-1 / 6, -0.1, -0.03, 0.0, 0.05, 0.1, 1 / 6])
def test_hue_needs_no_wrap_for_small_rotations(factor):
    """The recipe's hue strength is 0.1: the phase formula holds without reducing the hue modulo a turn."""
    x = images()
    close_to_torchvision(P.hue(x.float(), f(factor), wrap=False), TF.adjust_hue(x, factor))


def test_grayscale_and_solarize_match_torchvision():
    x = images()
    close_to_torchvision(P.grayscale(x.float()), TF.rgb_to_grayscale(x, num_output_channels=3))
    assert torch.equal(P.solarize(x.float(), 128).to(torch.uint8), TF.solarize(x, 128))


@pytest.mark.parametrize("sigma", [0.1, 0.4, 1.0, 2.0])
def test_gaussian_blur_matches_torchvision(sigma):
    x = images(size=96)
    taps = torch.tensor([P.blur_taps(9, sigma)], dtype=torch.float32)
    # taps in whole 4096ths move a value by a few hundredths of a level, so a value that torchvision
    # puts near a half rounds the other way now and then: on these noise images, up to ~3 % of them
    close_to_torchvision(
        P.gaussian_blur(x.float(), taps), TF.gaussian_blur(x, [9, 9], [sigma, sigma]), share=0.05
    )


def test_blur_taps_are_whole_4096ths_that_sum_to_one():
    narrow, wide = P.blur_taps(23, 0.3), P.blur_taps(23, 2.0)
    for taps in (narrow, wide):
        assert sum(taps) == 4096 and taps == taps[::-1] and all(isinstance(t, int) for t in taps)
    assert P.blur_reach(narrow) == 1 and P.blur_reach(wide) == 7  # outer taps under half a 4096th are 0
    assert P.blur_reach(P.blur_taps(23, 0.1)) == 0


@pytest.mark.parametrize("sigma", [0.4, 2.0])
def test_gaussian_blur_is_exact_whatever_computes_it(sigma):
    """The claim that lets the device path use any kernel: a float32 and a float64 convolution of the same
    whole taps, with the same roundings between passes, give the blur exactly."""
    x = images(n=2, size=40).double()
    row = P.blur_taps(23, sigma)
    reach = P.blur_reach(row)
    kernel = torch.tensor(row[11 - reach : 12 + reach], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        y = x.to(dtype).flatten(0, 1)[:, None]
        weight = kernel.to(dtype)
        y = torch.nn.functional.pad(y, [reach, reach, 0, 0], mode="reflect")
        y = torch.nn.functional.conv2d(y, weight.view(1, 1, 1, -1)).div_(256).round_()
        y = torch.nn.functional.pad(y, [0, 0, reach, reach], mode="reflect")
        y = torch.nn.functional.conv2d(y, weight.view(1, 1, -1, 1)).div_(65536).round_()
        ours = P.gaussian_blur(x.float(), torch.tensor([row, row], dtype=torch.float32))
        assert torch.equal(ours.double(), y.view_as(x).double()), dtype


def test_a_batch_gives_each_view_what_it_gives_alone():
    """Every step on, mixed parameters: the batched result equals the views one by one, bit for bit."""
    t = TwoViewTransform(crop_size=64, jitter_p=0.7, grayscale_p=0.4, blur_p=0.6, solarize_p=0.5)
    photometric = t.view1.photometric
    x = images(n=12, seed=3)
    rows = [photometric.params(*_uniforms(seed)) for seed in range(12)]
    batched = photometric(x, torch.tensor(rows, dtype=torch.float64))
    for i in range(12):
        assert torch.equal(batched[i], photometric(x[i : i + 1], [rows[i]])[0]), i
    # and the rows did exercise every step, on some views but not all
    for column in (P.JITTER_ON, P.GREY_ON, P.BLUR_ON, P.SOLARIZE_ON):
        assert 0 < sum(row[column] for row in rows) < 12


def _uniforms(seed: int):
    u = torch.rand(13, generator=gen(seed), dtype=torch.float64).tolist()
    return u[0], u[1:5], u[5:9], u[9], u[10], u[11], u[12]


ROTATION = v2.RandomRotation(30, interpolation=v2.InterpolationMode.BILINEAR)


@pytest.mark.parametrize("spatial", [(), (ROTATION,)])
def test_views_finished_later_equal_views_finished_in_the_worker(spatial):
    image = images(n=1, size=90, seed=5)[0]
    worker = TwoViewTransform(crop_size=48, spatial=spatial)
    later = TwoViewTransform(crop_size=48, spatial=spatial, photometric_later=True)
    done = [worker(image, sample_generator(0, 1, i)) for i in range(8)]
    crops = [later(image, sample_generator(0, 1, i)) for i in range(8)]
    assert isinstance(done[0], TwoViews) and isinstance(crops[0], TwoCrops)
    assert crops[0].view1.dtype == torch.uint8 and crops[0].params1.dtype == torch.float64
    batch = {k: torch.stack([getattr(c, k) for c in crops]) for k in TwoCrops._fields}
    view1 = later.view1.photometric(batch["view1"], batch["params1"])
    view2 = later.view2.photometric(batch["view2"], batch["params2"])
    for i, d in enumerate(done):
        assert torch.equal(view1[i], d.view1) and torch.equal(view2[i], d.view2)
        assert torch.equal(crops[i].coords1, d.coords1) and torch.equal(crops[i].coords2, d.coords2)


def test_rejects_float_views():
    with pytest.raises(ValueError, match="uint8"):
        TwoViewTransform(crop_size=32).view1.photometric(torch.zeros(1, 3, 32, 32), [[0.0] * P.PARAMS])


def test_views_normalized_later_equal_views_normalized_in_the_worker():
    """The trainer's worker path: uint8 levels through the loader, normalized on the device, bit for bit."""
    image = images(n=1, size=90, seed=6)[0]
    worker = TwoViewTransform(crop_size=48)
    later = TwoViewTransform(crop_size=48, normalize_later=True)
    for i in range(6):
        done, levels = worker(image, sample_generator(0, 2, i)), later(image, sample_generator(0, 2, i))
        assert levels.view1.dtype == levels.view2.dtype == torch.uint8
        assert torch.equal(later.view1.photometric.normalize(levels.view1[None])[0], done.view1)
        assert torch.equal(later.view2.photometric.normalize(levels.view2[None])[0], done.view2)
        assert torch.equal(levels.coords1, done.coords1)


@pytest.mark.parametrize(
    ("jitter", "size"),
    [
        ((0.4, 0.4, 0.2, 0.1), (48, 48)),  # BYOL's strengths: hue without the wrap
        ((0.9, 0.0, 1.5, 0.4), (37, 53)),  # factors > 1 (clamps), a skipped step, the wrap, not square
        ((0.4, 0.4, 0.2, 0.1), (300, 300)),  # over 256 px: the torch steps sum the contrast mean in float64
    ],
)
def test_the_workers_one_view_kernels_equal_the_batched_steps(jitter, size):
    """``finish`` (compiled, one view, channels-last) gives the batched torch steps' levels bit for bit:
    every step at every position of the jitter order, with the widest blur a 23-tap kernel allows."""
    photometric = P.Photometric(jitter, 0.8, 0.3, 0.7, (0.1, 2.0), 23, 0.4, 128, (0.5,) * 3, (0.25,) * 3)
    height, width = size
    x = torch.randint(0, 256, (60, 3, height, width), generator=gen(7), dtype=torch.uint8)
    x[:20] = torch.nn.functional.avg_pool2d(x[:20].float(), 5, 1, 2).round().byte()  # smooth images too
    x[:, :, :4] = x[:, :1, :4]  # greys and ties between channels, as images() has
    x[:, 1, 4:8] = x[:, 0, 4:8]
    rows = [photometric.params(*_uniforms(seed)) for seed in range(60)]
    batched = photometric(x, rows, normalize=False)
    seen = set()
    for i, row in enumerate(rows):
        one = photometric.finish(x[i], row)
        assert one.is_contiguous(memory_format=torch.channels_last) or one[None].is_contiguous(
            memory_format=torch.channels_last
        )
        assert torch.equal(one, batched[i]), i
        if row[P.JITTER_ON]:
            seen.update((position, int(step)) for position, step in enumerate(row[P.ORDER]))
    assert len(seen) == 16  # each of the four steps ran first, second, third and last
    assert max(P.blur_reach(P.blur_taps(23, row[P.SIGMA])) for row in rows if row[P.BLUR_ON]) >= 7
    for column in (P.JITTER_ON, P.GREY_ON, P.BLUR_ON, P.SOLARIZE_ON):
        assert 0 < sum(row[column] for row in rows) < 60


def test_finish_works_on_its_own_copy_and_rejects_what_is_not_one_uint8_view():
    photometric = TwoViewTransform(crop_size=32).view1.photometric
    view = images(size=32)[0]
    before = view.clone()
    row = photometric.params(0.0, [0.9, 0.1, 0.5, 0.9], [0.1, 0.2, 0.3, 0.4], 0.9, 0.0, 1.0, 0.9)
    assert not torch.equal(photometric.finish(view, row), view)
    assert torch.equal(view, before)
    with pytest.raises(ValueError, match="uint8"):
        photometric.finish(view.float(), row)
    with pytest.raises(ValueError, match="uint8"):
        photometric.finish(view[None], row)
    wide = P.Photometric((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, (2.0, 2.0), 23, 0.0, 128, (0,) * 3, (1,) * 3)
    with pytest.raises(ValueError, match="23-tap blur does not fit a 6x6 view"):
        wide.finish(view[:, :6, :6], row)  # reach 7: the torch steps' reflect padding refuses it too
    with pytest.raises(RuntimeError, match=r"[Pp]adding"):
        wide(view[None, :, :6, :6], [row])


def test_kernels_compile_uncached_where_numba_cannot_cache(monkeypatch):
    """numba refuses ``cache=True`` when neither the package's folder nor the user's cache can be
    written (a read-only install, no home): the kernels are then compiled in memory instead."""
    import numba

    from pixpro import photometric_cpu

    calls = []

    def njit(**options):
        calls.append(options)
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return numba.njit(**options)

    monkeypatch.setattr(photometric_cpu, "njit", njit)
    double = photometric_cpu._compiled(lambda v: v * 2)
    assert double(21) == 42
    assert calls == [{"nogil": True, "cache": True}, {"nogil": True}]


@pytest.mark.slow
@pytest.mark.parametrize(("augment_on", "compiled"), [("worker", True), ("device", False)])
def test_the_trainer_compiles_the_worker_steps_before_its_workers_fork(tmp_path, augment_on, compiled):
    """``build_data`` runs in the trainer process before the DataLoader forks its workers (every epoch):
    with ``augment_on: worker`` the compiled steps are then in that process, for the workers to inherit."""
    import subprocess
    import sys

    from tests.support.trainer import REPO, tiny_spec, trainer_env, write_spec

    spec = write_spec(tmp_path / "spec.json", tiny_spec(tmp_path / "data", data__augment_on=augment_on))
    script = (
        "from launch.builders import build_data\nfrom launch.collectives import DistEnv\n"
        "from pixpro import photometric_cpu\n"
        "from schemas import load_spec\n"
        "assert not photometric_cpu.finish.signatures\n"
        f"build_data(load_spec({str(spec)!r}), DistEnv(0, 0, 1))\n"
        "print(len(photometric_cpu.finish.signatures))\n"
    )
    run = [sys.executable, "-c", script]
    out = subprocess.run(run, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (int(out.stdout.split()[-1]) > 0) == compiled
