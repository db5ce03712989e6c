"""BYOL's photometric steps on a batch of uint8 views, each view with its own drawn parameters.

This code runs on the training device (the whole batch, ``data.augment_on: device``); a DataLoader worker
runs the same arithmetic on one view through :meth:`Photometric.finish` (compiled loops,
:mod:`pixpro.photometric_cpu`), so the two paths give the same views: every random choice is made in the
worker from the sample's generator and travels as a row of numbers (:data:`PARAMS`). Which views a
step touches is read from those rows on the host, so the device path needs no host sync.

The arithmetic is chosen to give identical results whatever the batch and on any device: elementwise
IEEE operations, one rounding each (no fused multiply-adds, which would round once instead of twice),
except where every value is a whole number below 2**24, which any evaluation computes exactly: the blur
(whole taps), the hue's masks and the contrast's mean grey level (a sum in any order). The steps work in
place on the call's own float copy. Results are torchvision's ``ColorJitter``/``RandomGrayscale``/
``GaussianBlur``/``RandomSolarize`` on uint8 images up to one grey level.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# One row of parameters per view, in this order.
JITTER_ON, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(5)
ORDER = slice(5, 9)  # the four jitter steps' indices (0 brightness ... 3 hue) in the order they run
GREY_ON, BLUR_ON, SIGMA, SOLARIZE_ON = range(9, 13)
PARAMS = 13

_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision
_TAP_ONE = 4096  # blur taps are whole 4096ths
_SIXTEENTHS = 16  # the blur's first pass keeps sixteenths of a level

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def jitter_factors(strengths: Sequence[float], u: Sequence[float]) -> list[float]:
    """ColorJitter's factors from four uniforms: brightness, contrast, saturation around 1, hue around 0."""
    out = []
    for idx, (strength, draw) in enumerate(zip(strengths, u, strict=True)):
        if idx == 3:
            out.append(strength * (2 * draw - 1))
        else:
            low = max(0.0, 1 - strength)
            out.append(low + draw * (1 + strength - low))
    return out


def blur_taps(kernel_size: int, sigma: float) -> list[int]:
    """torchvision's Gaussian taps in whole 4096ths, symmetric and summing to exactly 4096.

    Whole taps make the blur exact arithmetic (see :func:`gaussian_blur`); a tap under half a 4096th
    becomes 0, which is what lets a narrow blur skip most of the kernel.
    """
    r = kernel_size // 2
    weights = [math.exp(-0.5 * ((d - r) / sigma) ** 2) for d in range(kernel_size)]
    total = sum(weights)
    outer = [round(w / total * _TAP_ONE) for w in weights[:r]]
    return [*outer, _TAP_ONE - 2 * sum(outer), *outer[::-1]]


def blur_reach(taps: Sequence[float]) -> int:
    """How far from the centre the non-zero taps go."""
    r = len(taps) // 2
    return max((d for d in range(r + 1) if taps[r - d] != 0), default=0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Float luma ``[n, 1, H, W]`` of a float RGB batch, two roundings per term (no fused multiply-add)."""
    r, g, b = x.unbind(-3)
    grey, term = r * _GREY_WEIGHTS[0], g * _GREY_WEIGHTS[1]
    return grey.add_(term).add_(torch.mul(b, _GREY_WEIGHTS[2], out=term)).unsqueeze(-3)


def _to_levels(x: torch.Tensor, clamp: bool) -> torch.Tensor:
    """What a uint8 conversion does (clamp, truncate), kept in float: the steps chain without conversions.
    A blend with factors <= 1 stays within [0, 255], so the plan leaves the clamp out for it."""
    return (x.clamp_(0, 255) if clamp else x).floor_()


def brightness(x: torch.Tensor, factor: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    return _to_levels(x.mul_(factor), clamp)


def contrast(x: torch.Tensor, factor: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    grey = _grey(x).floor_()
    # whole numbers: their sum is exact in any order, so every device and batch agrees, in float32 while
    # every partial sum stays below 2**24 (views up to 256 x 256), else in float64
    pixels = grey.shape[-1] * grey.shape[-2]
    wide = torch.float32 if pixels * 255 < 2**24 else torch.float64
    mean = (grey.sum(dim=(-3, -2, -1), keepdim=True, dtype=wide).double() / pixels).float()
    return _to_levels(x.mul_(factor).add_(mean * (1 - factor)), clamp)  # torchvision's blend


def saturation(x: torch.Tensor, factor: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    grey = _grey(x).floor_().mul_(1 - factor)
    return _to_levels(x.mul_(factor).add_(grey), clamp)  # torchvision's blend


def hue(x: torch.Tensor, factor: torch.Tensor, wrap: bool = True) -> torch.Tensor:
    """Rotate hues by ``factor`` turns, torchvision's maths without the HSV round trip.

    Hue rotation keeps each pixel's max and min, so each channel is ``min + chroma * (1 - t(phase))`` with
    a piecewise-linear, 6-periodic ``t``: about a third of the work of a full RGB -> HSV -> RGB conversion.
    The masks are floats (comparisons to bool tensors cost several float operations on the CPU).
    ``wrap=False`` skips reducing the hue modulo a turn, which the formula below does not need when
    every ``|factor| <= 1/6`` (ColorJitter's hue strength is 0.1 in BYOL's recipe).
    """
    r, g, b = x.unbind(-3)
    mx = torch.maximum(r, g)
    mx = torch.maximum(mx, b, out=mx)
    mn = torch.minimum(r, g)
    mn = torch.minimum(mn, b, out=mn)
    chroma = mx - mn
    # whole numbers up to here, so every step is exact (a fused multiply-add too); one scratch plane
    is_r = (r - mx).add_(1).clamp_(0, 1)  # 1 where red is the max; ties go r, then g, then b (torchvision)
    is_g = (g - mx).add_(1).sub_(is_r).clamp_(0, 1)
    is_b = (1 - is_r).sub_(is_g)
    sixths = (g - b).mul_(is_r)
    scratch = torch.sub(b, r).add_(chroma, alpha=2).mul_(is_g)
    sixths.add_(scratch).add_(torch.sub(r, g, out=scratch).add_(chroma, alpha=4).mul_(is_b))
    sixths.div_(torch.clamp(chroma, min=1e-6, out=scratch)).add_(6 * factor[..., 0])
    if wrap:  # the hue in [0, 6], in sixths of a turn; without: in [-1 + 6 factor, 5 + 6 factor]
        sixths.sub_(torch.mul(sixths, 1 / 6, out=scratch).floor_().mul_(6))
    # each channel's phase less 5 (in [-6, 6] either way), where 1 - t(phase) = clamp(||p| - 3| - 1, 0, 1);
    # r, g, b are read for the last time above, so x takes the result
    # hsv -> rgb phases of R, G, B are 5, 3, 1 sixths; made on the device (a host tensor would be a
    # blocking copy on a GPU)
    offsets = torch.arange(0.0, -6.0, -2.0, device=x.device).view(3, 1, 1)
    torch.add(sixths.unsqueeze(-3), offsets, out=x)
    x.abs_().sub_(3).abs_().sub_(1).clamp_(0, 1)
    scale = 255.999 / 255  # torchvision's float -> uint8 conversion
    return x.mul_(chroma.mul_(scale).unsqueeze(-3)).add_(mn.mul_(scale).unsqueeze(-3)).floor_()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(_grey(x).floor_().expand_as(x))


def gaussian_blur(x: torch.Tensor, taps: torch.Tensor, reach: int | None = None) -> torch.Tensor:
    """Separable blur of ``[n, 3, H, W]`` levels with reflect padding, one row of whole ``taps`` per view
    (:func:`blur_taps`), rounded to levels like torchvision's.

    Everything is whole numbers below 2**24, so every product and partial sum is exact in float32 and any
    order, fused multiply-add or kernel gives the same result: levels times 4096ths (< 2**20), rounded to
    sixteenths of a level between the passes (< 2**12, off by at most 1/32 level), times 4096ths again
    (< 2**24). Taps further than ``reach`` from the centre must be zero for every view; ``reach`` defaults
    to what ``taps`` hold (a host sync when they are on a GPU).
    """
    k = taps.shape[1]
    r = k // 2
    if reach is None:
        reach = r - int((taps != 0).any(0).int().argmax())
    for dim, unit in ((-1, _TAP_ONE // _SIXTEENTHS), (-2, _TAP_ONE * _SIXTEENTHS)):
        n = x.shape[dim]
        padded = F.pad(x, [reach, reach, 0, 0] if dim == -1 else [0, 0, reach, reach], mode="reflect")
        acc = torch.mul(padded.narrow(dim, reach, n), taps[:, r].view(-1, 1, 1, 1), out=x)  # x is spent
        for d in range(1, reach + 1):
            w = taps[:, r - d].view(-1, 1, 1, 1)
            acc.addcmul_(padded.narrow(dim, reach - d, n), w).addcmul_(padded.narrow(dim, reach + d, n), w)
        acc.div_(unit).round_()  # a power of two: exact; then sixteenths, finally levels
    return x


def solarize(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert the levels at or above ``threshold`` (float arithmetic on whole levels: no bool tensors)."""
    at_or_above = (x - (threshold - 1)).clamp_(0, 1)
    return x.add_((255 - 2 * x).mul_(at_or_above))


def _to_device(numbers: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers as float32 on ``device`` in one non-blocking copy (from pinned memory on a GPU)."""
    packed = torch.tensor(numbers, dtype=torch.float32)
    if device.type == "cuda":
        packed = packed.pin_memory()
    return packed.to(device, non_blocking=True)


def _normalized(x: torch.Tensor, scale_shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per channel, in place; ``scale_shift`` holds the 3 scales, then the 3 shifts."""
    return x.mul_(scale_shift[:3].view(1, 3, 1, 1)).add_(scale_shift[3:6].view(1, 3, 1, 1))


class Photometric:
    """Colour jitter (random order), grey, blur, solarize and normalization of a batch of uint8 views.

    ``params(u)`` turns a view's uniforms (drawn by :mod:`pixpro.augment`) into its parameter row;
    calling the object applies the rows to a batch. ``jitter`` strengths of 0 skip that step.
    """

    def __init__(
        self,
        jitter: Sequence[float],
        jitter_p: float,
        grayscale_p: float,
        blur_p: float,
        blur_sigma: Sequence[float],
        blur_kernel_size: int,
        solarize_p: float,
        solarize_threshold: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.jitter = tuple(float(s) for s in jitter)
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p
        self.blur_p, self.solarize_p = blur_p, solarize_p
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.kernel_size = blur_kernel_size
        self.threshold = solarize_threshold
        self.scale = [1.0 / (255.0 * s) for s in std]
        self.shift = [-m / s for m, s in zip(mean, std, strict=True)]

    def params(
        self, jitter_u: float, factors_u: Sequence[float], order_u: Sequence[float], grey_u: float,
        blur_u: float, sigma_u: float, solarize_u: float,
    ) -> list[float]:  # fmt: skip
        """One view's parameter row from its uniforms (an argsort of four uniforms is a permutation)."""
        row = [0.0] * PARAMS
        row[JITTER_ON] = float(jitter_u < self.jitter_p)
        row[BRIGHTNESS : HUE + 1] = jitter_factors(self.jitter, factors_u)
        row[ORDER] = [float(i) for i in sorted(range(4), key=list(order_u).__getitem__)]
        row[GREY_ON] = float(grey_u < self.grayscale_p)
        row[BLUR_ON] = float(blur_u < self.blur_p)
        row[SIGMA] = self.blur_sigma[0] + sigma_u * (self.blur_sigma[1] - self.blur_sigma[0])
        row[SOLARIZE_ON] = float(solarize_u < self.solarize_p)
        return row

    def __call__(
        self, views: torch.Tensor, params: torch.Tensor | Sequence[Sequence[float]], normalize: bool = True
    ) -> torch.Tensor:
        """``[n, 3, S, S]`` uint8 views (any device) and their ``[n, PARAMS]`` rows (host) -> float32 views,
        ImageNet-normalized, on the views' device; with ``normalize=False``, the finished uint8 levels
        (for :meth:`normalize` to finish on the training device: a quarter of the bytes to move).

        Which views each step touches and with what numbers is planned on the host from the rows; the plan
        reaches the device in one non-blocking copy, so a CUDA batch costs no host sync.
        """
        rows = params.tolist() if isinstance(params, torch.Tensor) else [list(p) for p in params]
        if views.dtype != torch.uint8 or views.dim() != 4 or len(rows) != views.shape[0]:
            raise ValueError(f"expected [n, 3, S, S] uint8 views and n parameter rows, got {views.shape}")
        plan = self._plan(rows)
        numbers = [v for _, _, chosen, args in plan for v in chosen + args] + self.scale + self.shift
        packed = _to_device(numbers, views.device)
        # whole numbers 0..255 throughout: each step rounds as it would to uint8; planar, whatever came in
        x = views.to(torch.float32, memory_format=torch.contiguous_format)
        at = 0
        for op, width, chosen, args in plan:
            arg = packed[at + len(chosen) : at + len(chosen) + len(args)]
            arg = arg.view(-1, 1, 1, 1) if width == 1 else arg.view(len(chosen), width)
            if len(chosen) == x.shape[0]:
                x = op(x, arg)
            else:
                index = packed[at : at + len(chosen)].long()
                x[index] = op(x[index], arg)  # x is the call's own float copy
            at += len(chosen) + len(args)
        if not normalize:  # whole levels 0..255: the cast is exact (numpy's is ~4x torch's on a CPU)
            return torch.from_numpy(x.numpy().astype(np.uint8)) if x.device.type == "cpu" else x.byte()
        return _normalized(x, packed[at:])

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """Finished uint8 views -> float32, ImageNet-normalized: what the call does last, the same numbers,
        planar like the call's (whatever the layout of ``views``)."""
        x = views.to(torch.float32, memory_format=torch.contiguous_format)
        return _normalized(x, _to_device(self.scale + self.shift, views.device))

    def finish(self, view: torch.Tensor, row: Sequence[float]) -> torch.Tensor:
        """One ``[3, S, S]`` uint8 view on the CPU and its row -> its finished uint8 levels, channels-last.

        The levels the call gives a batch of this one view (``normalize=False``), bit for bit, from
        :mod:`pixpro.photometric_cpu`'s compiled one-pass steps: a loader worker's path, ~4x faster on one
        view (about 5x) than the torch steps, which are made for a batch on the training device.
        """
        from pixpro import photometric_cpu  # numba: imported (and compiled) where a worker first needs it

        if view.dtype != torch.uint8 or view.dim() != 3 or view.shape[0] != 3 or len(row) != PARAMS:
            raise ValueError(f"expected a [3, S, S] uint8 view and one parameter row, got {view.shape}")
        _, height, width = view.shape
        levels = torch.empty(height, width, 3, dtype=torch.uint8)
        levels.copy_(view.permute(1, 2, 0))  # the call's own copy, channels-last (a resized crop is already)
        whole = blur_taps(self.kernel_size, row[SIGMA]) if row[BLUR_ON] else [0]
        if blur_reach(whole) >= min(height, width):  # the kernels do not check bounds: refuse it here
            raise ValueError(f"a {self.kernel_size}-tap blur does not fit a {width}x{height} view")
        photometric_cpu.finish(
            levels.numpy().reshape(-1), height, width,
            np.array(self._jitter_steps(row), dtype=np.int64),
            np.array(row[BRIGHTNESS : HUE + 1], dtype=np.float32), self._hue_wraps, bool(row[GREY_ON]),
            np.array(whole, dtype=np.float32), blur_reach(whole), bool(row[SOLARIZE_ON]), self.threshold,
        )  # fmt: skip
        return levels.permute(2, 0, 1)

    @property
    def _hue_wraps(self) -> bool:
        """Whether hue reduces modulo a turn: decided from the configured strength, not the draws, so
        every path runs the same arithmetic (see :func:`hue`)."""
        return self.jitter[3] > 1 / 6

    def _jitter_steps(self, row: Sequence[float]) -> list[int]:
        """A view's jitter steps (0 brightness ... 3 hue) in the order they run, those of strength 0 left
        out; none when the jitter is off for it."""
        return [int(s) for s in row[ORDER] if self.jitter[int(s)] != 0] if row[JITTER_ON] else []

    def _plan(self, rows: list[list[float]]) -> list[tuple[Op, int, list[float], list[float]]]:
        """``(step, numbers per view, chosen view indices, their numbers flattened)`` in the order they run;
        steps that touch no view are left out."""
        plan: list[tuple[Op, int, list[float], list[float]]] = []

        def add(op: Op, width: int, chosen: list[int], args: list[float]) -> None:
            if chosen:
                plan.append((op, width, [float(i) for i in chosen], args))

        # the jitter: views grouped by (position in their order, step), run position by position
        groups: dict[tuple[int, int], list[int]] = {}
        for i, row in enumerate(rows):
            for position, step in enumerate(self._jitter_steps(row)):
                groups.setdefault((position, step), []).append(i)
        for (_, step), chosen in sorted(groups.items()):
            factors = [rows[i][BRIGHTNESS + step] for i in chosen]
            if step == HUE - BRIGHTNESS:
                add(hue if self._hue_wraps else functools.partial(hue, wrap=False), 1, chosen, factors)
            else:
                op = (brightness, contrast, saturation)[step]
                add(op if max(factors) > 1 else functools.partial(op, clamp=False), 1, chosen, factors)
        add(lambda v, _: grayscale(v), 0, [i for i, row in enumerate(rows) if row[GREY_ON]], [])
        # views grouped by how many taps their sigma needs: a narrow blur does not pay for a wide one
        by_reach: dict[int, list[int]] = {}
        taps: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if row[BLUR_ON]:
                taps[i] = blur_taps(self.kernel_size, row[SIGMA])
                by_reach.setdefault(blur_reach(taps[i]), []).append(i)
        by_reach.pop(0, None)  # a sigma so small that every outer tap is 0: the blur changes nothing
        for reach, group in by_reach.items():

            def blur(v: torch.Tensor, t: torch.Tensor, reach: int = reach) -> torch.Tensor:
                return gaussian_blur(v, t, reach)

            add(blur, self.kernel_size, group, [float(w) for i in group for w in taps[i]])
        solarized = [i for i, row in enumerate(rows) if row[SOLARIZE_ON]]
        add(lambda v, _: solarize(v, self.threshold), 0, solarized, [])
        return plan
