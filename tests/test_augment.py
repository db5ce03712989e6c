"""TwoViewTransform: determinism, the BYOL recipe's wiring, and coordinates that follow the pixels."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from pixpro.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViewTransform,
    ViewRecipe,
    ViewTransform,
    box_to_map,
    resized_crop,
    sample_crop,
)
from pixpro.geometry import box_geometry, map_geometry, positive_mask

# Crop, flip and nothing else: pixel values stay comparable with the input.
PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
FULL_SQUARE = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photo(height: int = 375, width: int = 500, seed: int = 0) -> torch.Tensor:
    """A smooth, colourful uint8 image (random noise would hide blur and flips in averages)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=g)
    up = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
    return (up * 255).round().to(torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_uint8(view: torch.Tensor) -> torch.Tensor:
    return ((view * STD + MEAN) * 255).round()


def test_same_seed_same_sample_whatever_the_global_rng():
    image = photo()
    spatial = [v2.RandomAffine(degrees=20, translate=(0.1, 0.1))]
    for t in (TwoViewTransform(crop_size=64), TwoViewTransform(crop_size=64, spatial=spatial)):
        torch.manual_seed(1)
        a = t(image, gen(7))
        torch.manual_seed(2)
        state = torch.get_rng_state()
        b = t(image, gen(7))
        assert torch.equal(torch.get_rng_state(), state), "global RNG was consumed"
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
        c = t(image, gen(8))
        for x, y in zip(a, c, strict=True):
            assert not torch.equal(x, y)


def test_views_are_normalized_float32():
    out = TwoViewTransform()(photo(), gen(0))
    for view in (out.view1, out.view2):
        assert view.shape == (3, 224, 224) and view.dtype == torch.float32
    assert out.coords1.shape == (4,) and out.coords1.dtype == torch.float32

    grey = torch.full((3, 40, 40), 200, dtype=torch.uint8)
    view = TwoViewTransform(crop_size=32, **PLAIN)(grey, gen(0)).view1
    expected = (200 / 255 - MEAN) / STD
    torch.testing.assert_close(view, expected.expand(3, 32, 32), rtol=0, atol=1e-5)


def test_degenerate_crop_gives_full_boxes_and_49_positives():
    out = TwoViewTransform(crop_size=64, **FULL_SQUARE)(photo(100, 100), gen(3))
    for box in (out.coords1, out.coords2):
        assert torch.equal(box, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    g = box_geometry(out.coords1[None], 7, 7)
    mask = positive_mask(g, box_geometry(out.coords2[None], 7, 7))[0]
    assert mask.sum() == 49 and torch.equal(mask, torch.eye(49))

    flipped = box_geometry(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), 7, 7)
    mask = positive_mask(g, flipped)[0]
    assert mask.sum() == 49
    mirror = torch.arange(49).view(7, 7).flip(1).flatten()
    assert torch.equal(mask.argmax(1), mirror)


def test_flip_swaps_x_and_mirrors_the_pixels():
    image = photo(64, 64)
    recipe = dict(crop_size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), **PLAIN)
    plain = ViewTransform(ViewRecipe(**recipe, flip_p=0.0))(image, gen(0))
    flipped = ViewTransform(ViewRecipe(**recipe, flip_p=1.0))(image, gen(0))
    assert torch.equal(flipped.coords, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.equal(flipped.view, plain.view.flip(-1))


def test_coordinate_map_of_identity_warp_matches_the_box():
    """Same seed, with and without an identity rotation: the map's cells are the box's cells."""
    recipe = ViewRecipe(crop_size=112)
    identity = [v2.RandomRotation(degrees=(0, 0), interpolation=InterpolationMode.BILINEAR)]
    flips = 0
    for seed in range(6):
        box = ViewTransform(recipe)(photo(), gen(seed)).coords
        coord_map = ViewTransform(recipe, identity)(photo(), gen(seed)).coords
        assert coord_map.shape == (3, 112, 112)
        flips += bool(box[0] > box[2])
        analytic = box_geometry(box[None], 7, 7)
        warped = map_geometry(coord_map[None], 7, 7)
        assert warped.valid.all()
        bin_size = analytic.bin_diagonal.item()
        assert (warped.centres - analytic.centres).abs().max() < 1e-3 * bin_size
        assert math.isclose(warped.bin_diagonal.item(), bin_size, rel_tol=1e-3)
    assert 0 < flips < 6  # both orientations were exercised


def test_rotation_by_90_pairs_each_cell_with_its_rotated_cell():
    recipe = ViewRecipe(crop_size=112, **FULL_SQUARE, **PLAIN)
    image = photo(112, 112)
    box = ViewTransform(recipe)(image, gen(0)).coords
    view, coord_map = ViewTransform(recipe, [v2.RandomRotation(degrees=(90, 90))])(image, gen(0))
    assert torch.equal(to_uint8(view), to_uint8(ViewTransform(recipe)(image, gen(0)).view).rot90(1, (1, 2)))

    rotated = map_geometry(coord_map[None], 7, 7)
    upright = box_geometry(box[None], 7, 7)
    assert rotated.valid.all()
    # Counter-clockwise: cell (r, c) of the rotated view shows cell (c, 6 - r) of the upright one.
    expected = torch.tensor([c * 7 + 6 - r for r in range(7) for c in range(7)])
    bin_size = upright.bin_diagonal.item()
    assert (rotated.centres[0] - upright.centres[0, expected]).abs().max() < 1e-3 * bin_size
    mask = positive_mask(rotated, upright)[0]
    assert torch.equal(mask.sum(1), torch.ones(49))
    assert torch.equal(mask.argmax(1), expected)


def test_rotation_by_45_invalidates_padded_corners():
    recipe = ViewRecipe(crop_size=112, **FULL_SQUARE)
    image = photo(112, 112)
    box = ViewTransform(recipe)(image, gen(0)).coords
    coord_map = ViewTransform(recipe, [v2.RandomRotation(degrees=(45, 45))])(image, gen(0)).coords
    assert coord_map[2].min() == 0 and coord_map[2].max() > 0.999

    # Every pixel points at its rotated source position (counter-clockwise: source offset = R(45°) offset),
    # including partly padded border pixels, whose coordinates are divided back by their valid weight.
    centre = torch.arange(112) + 0.5 - 56
    dx, dy = centre.expand(112, 112), centre[:, None].expand(112, 112)
    cos = sin = math.sqrt(0.5)
    error = torch.maximum(
        (coord_map[0] * 112 - (56 + dx * cos - dy * sin)).abs(),
        (coord_map[1] * 112 - (56 + dx * sin + dy * cos)).abs(),
    )
    assert error[coord_map[2] > 0.999].max() < 1e-3  # in pixels
    partly_padded = (coord_map[2] > 0.5) & (coord_map[2] < 0.99)
    assert partly_padded.sum() > 50 and error[partly_padded].max() < 0.5
    rotated = map_geometry(coord_map[None], 7, 7)
    valid = rotated.valid.view(7, 7)
    corners = [(0, 0), (0, 6), (6, 0), (6, 6)]
    assert not any(valid[r, c] for r, c in corners)
    assert valid[2:5, 2:5].all()
    mask = positive_mask(rotated, box_geometry(box[None], 7, 7))[0].view(7, 7, 49)
    for r, c in corners:
        assert mask[r, c].sum() == 0
    assert mask[3, 3].sum() >= 1


@pytest.mark.parametrize(
    "spatial",
    [
        v2.RandomAffine(degrees=30, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=10),
        v2.RandomPerspective(distortion_scale=0.5, p=1.0),
        v2.ElasticTransform(alpha=50.0, interpolation=InterpolationMode.NEAREST),
    ],
    ids=["affine", "perspective", "elastic"],
)
def test_map_and_image_are_warped_with_the_same_parameters(spatial):
    """Pixel values encode their source column/row; the map must point at the same source pixel."""
    size = 64
    ramp = torch.arange(size) * 4
    image = torch.stack(
        [ramp.expand(size, size), ramp[:, None].expand(size, size), 0 * ramp.expand(size, size)]
    )
    recipe = ViewRecipe(crop_size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5, **PLAIN)
    transform = ViewTransform(recipe, [spatial])
    for seed in range(4):
        view, coord_map = transform(image.to(torch.uint8), gen(seed))
        pixels = to_uint8(view)
        inside = coord_map[2] > 0.999
        assert inside.float().mean() > 0.3
        # Half a pixel from the image's nearest/rounded sampling plus at most half a pixel between the
        # official normalized convention and pixel centres.
        assert (pixels[0] / 4 - coord_map[0] * (size - 1))[inside].abs().max() < 1.01
        assert (pixels[1] / 4 - coord_map[1] * (size - 1))[inside].abs().max() < 1.01


def test_spatial_transform_probability_is_drawn_from_the_generator():
    recipe = ViewRecipe(crop_size=56)
    never = ViewTransform(recipe, [v2.RandomPerspective(p=0.0)])
    always = ViewTransform(recipe, [v2.RandomPerspective(p=1.0)])
    box = ViewTransform(recipe)(photo(), gen(4)).coords
    torch.testing.assert_close(never(photo(), gen(4)).coords, box_to_map(box, 56), rtol=0, atol=1e-6)
    assert not torch.allclose(always(photo(), gen(4)).coords, box_to_map(box, 56), atol=1e-3)


def test_rejects_spatial_transforms_it_cannot_track():
    with pytest.raises(ValueError, match="fill=0"):
        TwoViewTransform(spatial=[v2.RandomRotation(30, fill=128)])
    with pytest.raises(ValueError, match="Compose"):
        TwoViewTransform(spatial=[v2.Compose([v2.RandomRotation(30)])])


def test_image_smaller_than_crop_raises():
    with pytest.raises(ValueError, match=r"^image is 100x80 pixels, smaller than the 224-pixel crop$"):
        TwoViewTransform()(torch.zeros(3, 80, 100, dtype=torch.uint8), gen(0))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (torch.zeros(3, 64, 64), "uint8"),
        (torch.zeros(4, 64, 64, dtype=torch.uint8), r"\[3, H, W\]"),
        (torch.zeros(64, 64, dtype=torch.uint8), r"\[3, H, W\]"),
    ],
)
def test_rejects_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        TwoViewTransform(crop_size=32)(image, gen(0))


def test_grayscale_input_is_treated_as_three_equal_channels():
    grey = photo(60, 80)[:1]
    t = TwoViewTransform(crop_size=48)
    out = t(grey, gen(5))
    expected = t(grey.repeat(3, 1, 1), gen(5))
    for x, y in zip(out, expected, strict=True):
        assert torch.equal(x, y)
    assert out.view1.shape == (3, 48, 48)


def test_recipe_is_byol_asymmetric():
    t = TwoViewTransform()
    r1, r2 = t.view1.recipe, t.view2.recipe
    assert (r1.blur_p, r2.blur_p, r1.solarize_p, r2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert r1.jitter == (0.4, 0.4, 0.2, 0.1) and r1.jitter_p == 0.8 and r1.grayscale_p == 0.2
    assert r1.blur_kernel_size == 23 and r1.scale == (0.08, 1.0)


def test_each_colour_step_changes_the_view_as_configured():
    image = photo(64, 64)
    base = dict(crop_size=64, **FULL_SQUARE, **PLAIN)
    plain = to_uint8(ViewTransform(ViewRecipe(**base))(image, gen(0)).view)
    assert torch.equal(plain, image.float())  # full crop at full size is the identity

    grey = to_uint8(ViewTransform(ViewRecipe(**{**base, "grayscale_p": 1.0}))(image, gen(0)).view)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])

    solar = to_uint8(ViewTransform(ViewRecipe(**{**base, "solarize_p": 1.0}))(image, gen(0)).view)
    assert torch.equal(solar, TF.solarize(image, 128).float())

    blurred = to_uint8(ViewTransform(ViewRecipe(**{**base, "blur_p": 1.0}))(image, gen(0)).view)
    assert not torch.equal(blurred, plain)

    jittered = to_uint8(ViewTransform(ViewRecipe(**{**base, "jitter_p": 1.0}))(image, gen(0)).view)
    assert (jittered - plain).abs().mean() > 1.0


def test_resized_crop_gives_torchvisions_levels_for_every_layout():
    """Channels-last packing only changes where the resize reads: decoded JPEGs (rows of the whole image),
    planar tensors and grey images expanded to three channels all give torchvision's levels exactly."""
    from pixpro.data import decode_rgb

    g = torch.Generator().manual_seed(3)
    planar = torch.randint(0, 256, (3, 180, 250), dtype=torch.uint8, generator=g)
    buffer = io.BytesIO()
    Image.fromarray(planar.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=90)
    encoded = buffer.getvalue()
    decoded = decode_rgb(encoded)
    assert decoded.stride()[0] == 1  # what the decoder hands over: channels-last strides
    grey = planar[:1].expand(3, -1, -1)
    for image in (decoded, planar, grey):
        for top, left, h, w in [(0, 0, 180, 250), (10, 20, 64, 64), (5, 7, 150, 96), (100, 200, 40, 50)]:
            ours = resized_crop(image, top, left, h, w, 64)
            bilinear = InterpolationMode.BILINEAR
            theirs = TF.resized_crop(image, top, left, h, w, [64, 64], bilinear, antialias=True)
            assert torch.equal(ours, theirs), (tuple(image.stride()), top, left, h, w)
    assert torch.equal(resized_crop(planar, 0, 0, 64, 64, 64), planar[:, :64, :64])  # no resize: the pixels


def test_sample_crop_stays_inside_and_respects_scale_and_ratio():
    g = gen(0)
    for height, width in ((375, 500), (500, 375), (224, 224)):
        for _ in range(200):
            u = torch.rand(22, generator=g, dtype=torch.float64).tolist()
            top, left, h, w = sample_crop(height, width, (0.08, 1.0), (3 / 4, 4 / 3), u)
            assert 0 <= top <= height - h and 0 <= left <= width - w
            assert 0.08 * 0.95 <= h * w / (height * width) <= 1.0
            assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # No try fits a 1000x10 strip at ratio ~1 and large scale: centre crop at the closest ratio.
    assert sample_crop(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), [0.5] * 22) == (0, 493, 10, 13)


@pytest.mark.parametrize(
    "spatial",
    [
        v2.RandomRotation(30, interpolation=InterpolationMode.BILINEAR),
        v2.RandomAffine(
            20, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=5, interpolation=InterpolationMode.BILINEAR
        ),
        v2.RandomPerspective(0.4, p=1.0, interpolation=InterpolationMode.BILINEAR),
    ],
    ids=["rotation", "affine", "perspective"],
)
def test_one_warp_equals_torchvision_warping_image_and_map_separately(spatial):
    """The stacked single pass (analytic grid for rotation/affine) against torchvision's own transform on
    the image and its bilinear twin on the analytic map, with the same parameters."""
    from torch.random import fork_rng

    from pixpro.augment import _coordinate_twin

    recipe = ViewRecipe(crop_size=64, **PLAIN)
    plain, warped = ViewTransform(recipe), ViewTransform(recipe, [spatial])
    twin = _coordinate_twin(spatial)
    image = photo(120, 160)
    for seed in range(6):
        g = gen(seed)
        view, box, _ = plain.crop(image, g)
        torch.rand(1, generator=g, dtype=torch.float64)  # the apply draw, as ViewTransform.crop takes it
        state = int(torch.randint(0, 2**62, (1,), generator=g).item())
        with fork_rng(devices=[]):
            torch.default_generator.manual_seed(state)
            params = spatial.make_params([view])
            expected_view = spatial.transform(view, params)
            expected_map = twin.transform(box_to_map(box, 64), params)
        got = warped.crop(image, gen(seed))
        diff = (got.view.int() - expected_view.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
        valid = expected_map[2].clamp(0, 1)
        torch.testing.assert_close(got.coords[2], valid, rtol=0, atol=1e-5)
        inside = valid > 0.5  # the map's x, y are premultiplied by valid while warped
        expected_xy = expected_map[:2][:, inside] / valid[inside]
        torch.testing.assert_close(got.coords[:2][:, inside], expected_xy, rtol=0, atol=1e-5)
