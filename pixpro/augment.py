"""Two augmented views of one image, and where every view pixel came from in that image.

The recipe is BYOL's asymmetric one (PixPro's published setting). Every random choice is drawn from
the ``torch.Generator`` passed in, never from global RNG, so a sample is a pure function of
``(image, generator seed)``: data loading stays reproducible across workers, ranks and resumes.

Geometry follows the official code's normalized convention (see ``docs/architecture.md``): a crop
``w x h`` at column ``j``, row ``i`` of a ``W x H`` image is the box
``[j/(W-1), i/(H-1), (j+w-1)/(W-1), (i+h-1)/(H-1)]`` and a horizontal flip swaps the two x values.
With no general spatial transform a view's coordinates are that box (``[4]``, exact). With general
spatial transforms (rotation, affine, perspective, elastic ...) they are a coordinate map
``[3, S, S]`` = per output pixel ``(x, y, valid)``, built analytically from the box and warped with the
very parameters used on the image, so padding pixels are marked ``valid = 0``.

Padding is filled with 0 in the image (spatial transforms must be configured with ``fill=0``) and in
the coordinate map, whose channels are premultiplied by ``valid`` while warped: bilinear sampling then
averages only in-image coordinates, and dividing by the warped ``valid`` recovers them (exactly inside
the image, within a pixel where a sample straddles its edge).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional import _geometry as _tv_geometry

from pixpro.photometric import Photometric

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CROP_TRIES = 10  # torchvision's RandomResizedCrop: 10 rejection-sampling tries, then a centre crop
# Uniforms drawn per view, in this order. The count is fixed, so view 2's draws never depend on which
# branches view 1 took. Spatial transforms draw afterwards (one uniform each, then one integer seed),
# so a view's crop, flip and colour are the same with or without them.
_CROP = slice(0, 2 * _CROP_TRIES + 2)  # (scale, log-ratio) per try, then the position
_FLIP = _CROP.stop
_JITTER = _FLIP + 1  # apply?, then 4 factors, then 4 order keys
_JITTER_FACTORS = slice(_JITTER + 1, _JITTER + 5)
_JITTER_ORDER = slice(_JITTER + 5, _JITTER + 9)
_GREY = _JITTER + 9
_BLUR = _GREY + 1  # apply?, then sigma
_SOLARIZE = _BLUR + 2
_VIEW_DRAWS = _SOLARIZE + 1


class TwoViews(NamedTuple):
    view1: torch.Tensor  # [3, S, S] float32, ImageNet-normalized (uint8 levels with normalize_later)
    view2: torch.Tensor
    coords1: torch.Tensor  # box [4] or coordinate map [3, S, S] (x, y, valid), float32
    coords2: torch.Tensor


class TwoCrops(NamedTuple):
    """Two views before their photometric steps (``data.augment_on: device``)."""

    view1: torch.Tensor  # [3, S, S] uint8
    view2: torch.Tensor
    coords1: torch.Tensor
    coords2: torch.Tensor
    params1: torch.Tensor  # [PARAMS] float64: pixpro.photometric's row for view 1
    params2: torch.Tensor


class OneView(NamedTuple):
    view: torch.Tensor
    coords: torch.Tensor


@dataclass(frozen=True)
class ViewRecipe:
    """Augmentation settings of one view; defaults are BYOL's view 1."""

    crop_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop_size < 2:
            raise ValueError(f"crop_size must be at least 2 pixels, got {self.crop_size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        if min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got {self.jitter}")
        if not 0 <= self.solarize_threshold <= 255:
            raise ValueError(f"solarize_threshold must be in [0, 255], got {self.solarize_threshold}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")

    @property
    def blur_kernel_size(self) -> int:
        """About 10% of the crop, made odd (23 at 224), as BYOL."""
        k = int(0.1 * self.crop_size)
        return k + 1 if k % 2 == 0 else k


def sample_crop(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], u: Sequence[float]
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop, torchvision's algorithm driven by given uniforms.

    ``u`` holds ``2 * 10 + 2`` numbers in [0, 1): a (scale, log-ratio) pair per try, then the position.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(_CROP_TRIES):
        target_area = area * (scale[0] + u[2 * t] * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u[2 * t + 1] * (log_hi - log_lo))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[-2] * (height - h + 1)), height - h)
            left = min(int(u[-1] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_box(top: int, left: int, h: int, w: int, height: int, width: int, flipped: bool) -> torch.Tensor:
    """The official code's normalized box of a crop; a horizontal flip swaps x_ul and x_lr."""
    x_ul, x_lr = left / (width - 1), (left + w - 1) / (width - 1)
    if flipped:
        x_ul, x_lr = x_lr, x_ul
    return torch.tensor([x_ul, top / (height - 1), x_lr, (top + h - 1) / (height - 1)], dtype=torch.float32)


def box_to_map(box: torch.Tensor, size: int) -> torch.Tensor:
    """Analytic ``[3, S, S]`` map (x, y, valid=1); pixel u is at ``x_ul + (u + 0.5) / S * (x_lr - x_ul)``."""
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x = box[0] + t * (box[2] - box[0])
    y = box[1] + t * (box[3] - box[1])
    return torch.stack([x.expand(size, size), y[:, None].expand(size, size), torch.ones(size, size)])


def check_image(image: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Validate a uint8 ``[3, H, W]`` or ``[1, H, W]`` image; grayscale comes back as 3 channels."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a uint8 torch.Tensor [3, H, W], got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [3, H, W] (RGB) or [1, H, W] (grayscale), got {tuple(image.shape)}")
    height, width = image.shape[1:]
    if min(height, width) < crop_size:
        raise ValueError(f"image is {width}x{height} pixels, smaller than the {crop_size}-pixel crop")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def resized_crop(image: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """torchvision's antialiased bilinear ``resized_crop`` of a crop inside ``image``, the same levels.

    torch's uint8 resize works channels-last: given anything else (a decoded JPEG is channels-last but
    with the whole image's row stride) it copies the input into that layout and its result back to
    planar. Packing the crop first (a row copy) and keeping the result channels-last makes the resize
    ~60 % of the time (300-px crop: 82 against 135 µs); every later step takes any layout."""
    crop = image[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _is_zero_fill(fill: Any) -> bool:
    if fill is None:
        return True
    if isinstance(fill, dict):
        return all(_is_zero_fill(v) for v in fill.values())
    if isinstance(fill, (int, float)):
        return fill == 0
    return all(v == 0 for v in fill)


def _coordinate_twin(transform: v2.Transform) -> v2.Transform:
    """A copy of ``transform`` that warps coordinate maps: bilinear, zero padding.

    ``_fill`` None makes torchvision sample with plain zero padding; its fill=0 path would additionally
    multiply by the in-image weight, squaring ``valid`` at the border.
    """
    if not isinstance(transform, v2.Transform) or type(transform).transform is v2.Transform.transform:
        raise ValueError(
            f"spatial transforms must be single torchvision v2 transforms with make_params/transform "
            f"(no Compose/RandomApply), got {type(transform).__name__}"
        )
    if not _is_zero_fill(getattr(transform, "fill", None)):
        raise ValueError(
            f"{type(transform).__name__} has fill={transform.fill!r}; pixpro pads images and coordinate maps "
            "with 0, so construct it with fill=0"
        )
    twin = copy.copy(transform)
    if hasattr(twin, "interpolation"):
        twin.interpolation = InterpolationMode.BILINEAR
    if hasattr(twin, "_fill"):
        twin._fill = {"others": None}
    return twin


class OneCrop(NamedTuple):
    """A view before its photometric steps: uint8 pixels, coordinates, and the drawn photometric row."""

    view: torch.Tensor  # [3, S, S] uint8
    coords: torch.Tensor
    params: list[float]  # pixpro.photometric.PARAMS numbers


class ViewTransform:
    """One view: crop, flip, optional general spatial transforms, colour, normalize.

    :meth:`crop` does the geometric part on uint8 and draws the photometric parameters;
    :attr:`photometric` applies them (here, or batched on the training device). Calling the transform
    does both. The coordinates are a box ``[4]`` if ``spatial`` is empty, else a map ``[3, S, S]``.
    """

    def __init__(self, recipe: ViewRecipe | None = None, spatial: Sequence[v2.Transform] = ()) -> None:
        self.recipe = r = recipe or ViewRecipe()
        self.spatial = [(t, _coordinate_twin(t)) for t in spatial]
        self.photometric = Photometric(
            r.jitter, r.jitter_p, r.grayscale_p, r.blur_p, r.blur_sigma, r.blur_kernel_size,
            r.solarize_p, r.solarize_threshold, r.mean, r.std,
        )  # fmt: skip

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> OneView:
        return self.apply(check_image(image, self.recipe.crop_size), generator)

    def apply(self, image: torch.Tensor, generator: torch.Generator, normalize: bool = True) -> OneView:
        """Like calling the transform, for an image already through :func:`check_image`; without
        ``normalize`` the view is the finished uint8 levels (see :meth:`Photometric.normalize`)."""
        view, coords, params = self.crop(image, generator)
        levels = self.photometric.finish(view, params)
        return OneView(self.photometric.normalize(levels[None])[0] if normalize else levels, coords)

    def crop(self, image: torch.Tensor, generator: torch.Generator) -> OneCrop:
        """The geometric steps (uint8) and the photometric parameter row, all drawn from ``generator``."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        r = self.recipe
        u = torch.rand(_VIEW_DRAWS, generator=generator, dtype=torch.float64).tolist()
        height, width = image.shape[1:]

        top, left, h, w = sample_crop(height, width, r.scale, r.ratio, u[_CROP])
        view = resized_crop(image, top, left, h, w, r.crop_size)
        flipped = u[_FLIP] < r.flip_p
        if flipped:
            view = TF.horizontal_flip(view)
        coords = crop_box(top, left, h, w, height, width, flipped)

        if self.spatial:
            draws = torch.rand(len(self.spatial), generator=generator, dtype=torch.float64).tolist()
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
            view, coords = self._warp(view, box_to_map(coords, r.crop_size), seed, draws)
        params = self.photometric.params(
            u[_JITTER], u[_JITTER_FACTORS], u[_JITTER_ORDER], u[_GREY], u[_BLUR], u[_BLUR + 1], u[_SOLARIZE]
        )
        return OneCrop(view, coords, params)

    def _warp(
        self, view: torch.Tensor, coord_map: torch.Tensor, seed: int, apply_draws: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply each spatial transform to the image and, with identical parameters, to the coordinate map.

        A bilinear transform warps both in one pass: the image, a plane of ones (torchvision's fill mask)
        and the map are stacked and sampled on one grid, which gives torchvision's image exactly and the
        map as its bilinear twin would. ``make_params`` uses global RNG, so it runs inside a forked RNG
        whose CPU generator is seeded from the caller's generator (CUDA RNG untouched).
        """
        # The analytic map has valid = 1 everywhere, so it is already premultiplied by valid.
        image = view.to(torch.float32)
        ones = torch.ones_like(image[:1])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            for (transform, twin), draw in zip(self.spatial, apply_draws, strict=True):
                p = getattr(transform, "p", None)
                if isinstance(p, (int, float)) and not draw < p:
                    continue
                params = transform.make_params([view])
                if getattr(transform, "interpolation", None) == InterpolationMode.BILINEAR:
                    stacked = torch.cat([image, ones, coord_map])
                    matrix = _inverse_affine(transform, params, view.shape[-1])
                    if matrix is None:
                        warped = twin.transform(stacked, params)
                    else:  # rotation/affine: the same sampling, without torchvision's matrix product
                        grid = _affine_grid(matrix, view.shape[-1])
                        warped = F.grid_sample(stacked[None], grid, align_corners=False)[0]
                    image = warped[:3].mul_(warped[3:4]).round_()  # fill 0: image * mask, as torchvision
                    coord_map = warped[4:]
                else:  # the image is sampled otherwise (nearest, ...): two passes
                    image = transform.transform(image.to(torch.uint8), params).to(torch.float32)
                    coord_map = twin.transform(coord_map, params)
        valid = coord_map[2:3].clamp(0.0, 1.0)
        xy = torch.where(valid > 0, coord_map[:2] / valid.clamp_min(1e-12), 0.0)
        return image.to(torch.uint8), torch.cat([xy, valid])


def _inverse_affine(transform: v2.Transform, params: dict[str, Any], size: int) -> list[float] | None:
    """The inverse affine matrix torchvision samples a RandomRotation/RandomAffine with, or None when the
    transform is of another kind (or takes one of rotate's exact fast paths, or expands)."""
    if type(transform) is v2.RandomRotation and not transform.expand:
        angle = params["angle"] % 360
        if transform.center is None and angle in (0, 90, 180, 270):
            return None
        center, angle, translate, scale, shear = transform.center, -angle, [0.0, 0.0], 1.0, [0.0, 0.0]
    elif type(transform) is v2.RandomAffine:
        center = transform.center
        angle, translate, scale, shear = (params[k] for k in ("angle", "translate", "scale", "shear"))
        angle, translate, shear, center = _tv_geometry._affine_parse_args(
            angle, translate, scale, shear, InterpolationMode.BILINEAR, center
        )
    else:
        return None
    center_f = [0.0, 0.0] if center is None else [c - size * 0.5 for c in center]
    translate = [float(t) for t in translate]
    return _tv_geometry._get_inverse_affine_matrix(center_f, angle, translate, scale, shear)


def _affine_grid(matrix: list[float], size: int) -> torch.Tensor:
    """torchvision's sampling grid of an affine warp of a square image, from its matrix: built directly
    (three broadcast multiply-adds) instead of a ``[S*S, 3] x [3, 2]`` matrix product, ~6x faster."""
    theta = torch.tensor(matrix, dtype=torch.float32).view(2, 3) / (0.5 * size)
    x = torch.linspace((1.0 - size) * 0.5, (size - 1.0) * 0.5, steps=size)
    y = x[:, None]
    gx = x * theta[0, 0] + y * theta[0, 1] + theta[0, 2]
    gy = x * theta[1, 0] + y * theta[1, 1] + theta[1, 2]
    return torch.stack([gx, gy], dim=-1)[None]


def _per_view(p: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(p, (int, float)):
        return float(p), float(p)
    if len(p) != 2:
        raise ValueError(f"expected one probability or a (view 1, view 2) pair, got {p!r}")
    return float(p[0]), float(p[1])


class TwoViewTransform:
    """BYOL's asymmetric two-view recipe: ``(image, generator) -> TwoViews``.

    Settings shared by both views are scalars; ``blur_p`` and ``solarize_p`` are (view 1, view 2)
    pairs (a scalar applies to both). ``spatial`` transforms (torchvision v2, each with ``fill=0``) run
    after crop/resize/flip and before colour, on both views, and switch the coordinates from boxes to
    coordinate maps. With ``photometric_later`` the transform returns :class:`TwoCrops` instead: uint8
    views and their parameter rows, for ``view1.photometric``/``view2.photometric`` to finish in a batch
    (on the training device); the finished views are the same as the ones it would have returned. With
    ``normalize_later`` it returns the finished views as uint8 levels, for ``photometric.normalize`` on
    the training device: a quarter of the bytes through the loader's shared memory and to the GPU.
    """

    def __init__(
        self,
        crop_size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float | tuple[float, float] = (1.0, 0.1),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: float | tuple[float, float] = (0.0, 0.2),
        solarize_threshold: int = 128,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        spatial: Sequence[v2.Transform] = (),
        photometric_later: bool = False,
        normalize_later: bool = False,
    ) -> None:
        recipe = ViewRecipe(
            crop_size=crop_size,
            scale=(scale[0], scale[1]),
            ratio=(ratio[0], ratio[1]),
            flip_p=flip_p,
            jitter=(jitter[0], jitter[1], jitter[2], jitter[3]),
            jitter_p=jitter_p,
            grayscale_p=grayscale_p,
            blur_sigma=(blur_sigma[0], blur_sigma[1]),
            solarize_threshold=solarize_threshold,
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
        )
        self.crop_size = crop_size
        self.photometric_later = photometric_later
        self.normalize_later = normalize_later
        blur, solar = _per_view(blur_p), _per_view(solarize_p)
        self.view1 = ViewTransform(replace(recipe, blur_p=blur[0], solarize_p=solar[0]), spatial)
        self.view2 = ViewTransform(replace(recipe, blur_p=blur[1], solarize_p=solar[1]), spatial)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> TwoViews | TwoCrops:
        """View 1 then view 2, both drawn from ``generator``; the same seed gives identical outputs."""
        image = check_image(image, self.crop_size)
        if self.photometric_later:
            (v1, c1, p1), (v2, c2, p2) = self.view1.crop(image, generator), self.view2.crop(image, generator)
            as_row = torch.tensor([p1, p2], dtype=torch.float64)
            return TwoCrops(v1, v2, c1, c2, as_row[0], as_row[1])
        view1, coords1 = self.view1.apply(image, generator, not self.normalize_later)
        view2, coords2 = self.view2.apply(image, generator, not self.normalize_later)
        return TwoViews(view1, view2, coords1, coords2)
