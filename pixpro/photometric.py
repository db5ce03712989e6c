"""BYOL's photometric steps on a batch of uint8 views, each view with its own drawn parameters.

The same code runs in a DataLoader worker (a batch of one view) and on the training device (the whole
batch, ``data.augment_on: device``), so the two paths give the same views: every random choice is made in
the worker from the sample's generator and travels as a row of numbers (:data:`PARAMS`). Which views a
step touches is read from those rows on the host, so the device path needs no host sync.

The arithmetic is chosen to give identical results whatever the batch and on any device:
elementwise IEEE operations only (no fused multiply-adds, which would round once instead of twice), and
the one reduction, the mean grey level of the contrast step, sums whole numbers below 2**24, which is
exact in float32 in any order. Results are torchvision's ``ColorJitter``/``RandomGrayscale``/
``GaussianBlur``/``RandomSolarize`` on uint8 images up to one grey level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# One row of parameters per view, in this order.
JITTER_ON, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(5)
ORDER = slice(5, 9)  # the four jitter steps' indices (0 brightness ... 3 hue) in the order they run
GREY_ON, BLUR_ON, SIGMA, SOLARIZE_ON = range(9, 13)
PARAMS = 13

_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision
_HSV_OFFSETS = (5.0, 3.0, 1.0)  # hsv -> rgb phase of R, G, B, in sixths
_TAP_FLOOR = 1e-7  # blur taps lighter than this are dropped (a small sigma needs only a few)

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


def blur_taps(kernel_size: int, sigma: float) -> list[float]:
    """A Gaussian's ``kernel_size`` taps (torchvision's kernel) with negligible outer taps set to zero."""
    r = kernel_size // 2
    weights = [math.exp(-0.5 * ((d - r) / sigma) ** 2) for d in range(kernel_size)]
    total = sum(weights)
    kept = [w / total if w / total > _TAP_FLOOR else 0.0 for w in weights]
    total = sum(kept)
    return [w / total for w in kept]


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Float luma ``[n, 1, H, W]`` of a float RGB batch, two roundings per term (no fused multiply-add)."""
    r, g, b = x.unbind(-3)
    return (r * _GREY_WEIGHTS[0] + g * _GREY_WEIGHTS[1] + b * _GREY_WEIGHTS[2]).unsqueeze(-3)


def _to_levels(x: torch.Tensor) -> torch.Tensor:
    """What a uint8 conversion does (clamp, truncate), kept in float: the steps chain without conversions."""
    return x.clamp_(0, 255).floor_()


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _to_levels(x * factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    grey = _grey(x).floor_()
    # whole numbers: the float64 sum is exact in any order, so every device and batch agrees
    total = grey.sum(dim=(-3, -2, -1), keepdim=True, dtype=torch.float64)
    mean = (total / (grey.shape[-1] * grey.shape[-2])).float()
    return _to_levels((x - mean).mul_(factor).add_(mean))


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    grey = _grey(x).floor_()
    return _to_levels((x - grey).mul_(factor).add_(grey))  # a grey pixel stays exactly grey


def _is_zero(d: torch.Tensor) -> torch.Tensor:
    """1.0 where a whole, non-negative difference is 0, else 0.0: comparisons without bool tensors, which
    cost several times a float operation on the CPU."""
    return d.neg_().add_(1).clamp_(0, 1)


def hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate hues by ``factor`` turns, torchvision's maths without the HSV round trip.

    Hue rotation keeps each pixel's max and min, so each channel is ``max - chroma * t(phase)`` with a
    piecewise-linear ``t``: about a third of the work of a full RGB -> HSV -> RGB conversion.
    """
    r, g, b = x.unbind(-3)
    mx = torch.maximum(torch.maximum(r, g), b)
    chroma = mx - torch.minimum(torch.minimum(r, g), b)
    is_r = _is_zero(mx - r)  # ties resolve r, then g, then b, as torchvision
    is_g = _is_zero(mx - g).mul_(1 - is_r)
    is_b = 1 - is_r - is_g
    sixths = (g - b).mul_(is_r) + (b - r + 2 * chroma).mul_(is_g) + (r - g + 4 * chroma).mul_(is_b)
    sixths = sixths.div_(chroma.clamp(min=1e-6)).add_(6 * factor[..., 0])
    offsets = torch.tensor(_HSV_OFFSETS, device=x.device).view(3, 1, 1)
    phase = sixths.unsqueeze(-3) + offsets
    phase.sub_(torch.floor(phase * (1 / 6)).mul_(6))
    t = torch.minimum(phase, 4.0 - phase).clamp_(0.0, 1.0)
    scale = 255.999 / 255  # torchvision's float -> uint8 conversion
    return (mx * scale).unsqueeze(-3).sub(t.mul_((chroma * scale).unsqueeze(-3))).floor_()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return _grey(x).floor_().expand_as(x).contiguous()


def gaussian_blur(x: torch.Tensor, taps: torch.Tensor, reach: int | None = None) -> torch.Tensor:
    """Separable blur of ``[n, 3, H, W]`` levels with reflect padding, one row of ``taps`` per view.

    Symmetric taps are applied in pairs (``(left + right) * w``); taps further than ``reach`` from the
    centre must be zero for every view and are skipped, which changes nothing (adding ``+0`` is exact).
    ``reach`` defaults to what ``taps`` hold (a host sync when they are on a GPU).
    """
    k = taps.shape[1]
    r = k // 2
    if reach is None:
        reach = r - int((taps != 0).any(0).int().argmax())
    used = [d >= r - reach for d in range(r)]
    out = x
    for dim in (-1, -2):
        n = out.shape[dim]
        padded = F.pad(out, [r, r, 0, 0] if dim == -1 else [0, 0, r, r], mode="reflect")
        acc = padded.narrow(dim, r, n) * taps[:, r].view(-1, 1, 1, 1)
        for d in range(r):
            if used[d]:
                pair = padded.narrow(dim, d, n) + padded.narrow(dim, k - 1 - d, n)
                acc += pair.mul_(taps[:, d].view(-1, 1, 1, 1))
        out = acc
    return out.round_().clamp_(0, 255)


def solarize(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert the levels at or above ``threshold`` (float arithmetic on whole levels: no bool tensors)."""
    at_or_above = (x - (threshold - 1)).clamp_(0, 1)
    return (255 - 2 * x).mul_(at_or_above).add_(x)


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

    def __call__(self, views: torch.Tensor, params: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """``[n, 3, S, S]`` uint8 views (any device) and their ``[n, PARAMS]`` rows (host) -> float32 views,
        ImageNet-normalized, on the views' device.

        Which views each step touches and with what numbers is planned on the host from the rows; the plan
        reaches the device in one non-blocking copy, so a CUDA batch costs no host sync.
        """
        rows = params.tolist() if isinstance(params, torch.Tensor) else [list(p) for p in params]
        if views.dtype != torch.uint8 or views.dim() != 4 or len(rows) != views.shape[0]:
            raise ValueError(f"expected [n, 3, S, S] uint8 views and n parameter rows, got {views.shape}")
        plan = self._plan(rows)
        numbers = [v for _, _, chosen, args in plan for v in chosen + args] + self.scale + self.shift
        packed = torch.tensor(numbers, dtype=torch.float32)
        if views.device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(views.device, non_blocking=True)
        x = views.float()  # whole numbers 0..255 throughout: each step rounds as it would to uint8
        at = 0
        for op, width, chosen, args in plan:
            index = packed[at : at + len(chosen)].long()
            arg = packed[at + len(chosen) : at + len(chosen) + len(args)]
            at += len(chosen) + len(args)
            arg = arg.view(-1, 1, 1, 1) if width == 1 else arg.view(len(chosen), width)
            if len(chosen) == x.shape[0]:
                x = op(x, arg)
            else:
                x[index] = op(x[index], arg)  # x is the call's own float copy
        scale, shift = packed[at : at + 3].view(1, 3, 1, 1), packed[at + 3 : at + 6].view(1, 3, 1, 1)
        return x.mul_(scale).add_(shift)

    def _plan(self, rows: list[list[float]]) -> list[tuple[Op, int, list[float], list[float]]]:
        """``(step, numbers per view, chosen view indices, their numbers flattened)`` in the order they run;
        steps that touch no view are left out."""
        plan: list[tuple[Op, int, list[float], list[float]]] = []

        def add(op: Op, width: int, chosen: list[int], args: list[float]) -> None:
            if chosen:
                plan.append((op, width, [float(i) for i in chosen], args))

        steps: tuple[Op, ...] = (brightness, contrast, saturation, hue)
        jittered = [i for i, row in enumerate(rows) if row[JITTER_ON]]
        for position in range(4):
            for step, op in enumerate(steps):
                if self.jitter[step] != 0:
                    chosen = [i for i in jittered if rows[i][ORDER.start + position] == step]
                    add(op, 1, chosen, [rows[i][BRIGHTNESS + step] for i in chosen])
        add(lambda v, _: grayscale(v), 0, [i for i, row in enumerate(rows) if row[GREY_ON]], [])
        # views grouped by how many taps their sigma needs: a narrow blur does not pay for a wide one
        by_reach: dict[int, list[int]] = {}
        taps: dict[int, list[float]] = {}
        for i, row in enumerate(rows):
            if row[BLUR_ON]:
                taps[i] = blur_taps(self.kernel_size, row[SIGMA])
                by_reach.setdefault(sum(w > 0 for w in taps[i]) // 2, []).append(i)
        for reach, group in by_reach.items():

            def blur(v: torch.Tensor, t: torch.Tensor, reach: int = reach) -> torch.Tensor:
                return gaussian_blur(v, t, reach)

            add(blur, self.kernel_size, group, [w for i in group for w in taps[i]])
        solarized = [i for i, row in enumerate(rows) if row[SOLARIZE_ON]]
        add(lambda v, _: solarize(v, self.threshold), 0, solarized, [])
        return plan
