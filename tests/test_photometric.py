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


def test_grayscale_and_solarize_match_torchvision():
    x = images()
    close_to_torchvision(P.grayscale(x.float()), TF.rgb_to_grayscale(x, num_output_channels=3))
    assert torch.equal(P.solarize(x.float(), 128).to(torch.uint8), TF.solarize(x, 128))


@pytest.mark.parametrize("sigma", [0.1, 0.4, 1.0, 2.0])
def test_gaussian_blur_matches_torchvision(sigma):
    x = images(size=96)
    taps = torch.tensor([P.blur_taps(9, sigma)])
    close_to_torchvision(P.gaussian_blur(x.float(), taps), TF.gaussian_blur(x, [9, 9], [sigma, sigma]))


def test_blur_taps_drop_only_negligible_weights():
    narrow, wide = P.blur_taps(23, 0.3), P.blur_taps(23, 2.0)
    assert abs(sum(narrow) - 1) < 1e-12 and abs(sum(wide) - 1) < 1e-12
    assert narrow.count(0.0) > 10 and wide.count(0.0) == 2  # sigma 2: only the two outermost (< 1e-7)
    assert narrow == narrow[::-1]


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
