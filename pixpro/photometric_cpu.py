"""The photometric steps on one uint8 view in a loader worker: each step one compiled pass (numba).

:mod:`pixpro.photometric` runs each step as tens of elementwise torch passes over float planes, which
is what a batch on a GPU wants; on one view in a CPU worker those passes, not the arithmetic, are the
cost. Here each step is one loop over the view's channels-last pixels, compiled by numba and vectorized
by LLVM: hue 236 -> 28 µs, a sigma-2 blur 526 -> 128 µs per 224-px view.

The results are :class:`pixpro.photometric.Photometric`'s bit for bit (tests): every operation is the
same IEEE float32 operation in the same order, one rounding each (numba contracts no multiply-adds
unless asked to), and whole-number steps (grey sums, blur taps) are exact in any order. Constants are
float32 globals: a Python float in a numba expression would promote it to float64.

Indexing goes through row slices, never ``base + offset`` into a whole array: numba cannot prove such an
index non-negative, and its negative-index wraparound keeps LLVM from vectorizing the loop (10x here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

_f32 = np.float32
_W_R, _W_G, _W_B = _f32(0.2989), _f32(0.587), _f32(0.114)  # ITU-R 601-2 luma, as photometric._grey
_ZERO, _ONE, _TWO, _THREE, _FOUR, _SIX = (_f32(v) for v in (0, 1, 2, 3, 4, 6))
_MAX_LEVEL = _f32(255)
_TINY_CHROMA = _f32(1e-6)
_A_SIXTH = _f32(1 / 6)
_TO_BYTE = _f32(255.999 / 255)  # torchvision's float -> uint8 conversion, as photometric.hue
# x + 1.5 * 2**23 - 1.5 * 2**23 rounds a float32 |x| < 2**22 to a whole number, ties to even: torch's
# round, in two vectorizable adds (np.rint is a libm call per value here)
_ROUNDER = _f32(12582912.0)
_FIRST_PASS, _SECOND_PASS = _f32(1 / 256), _f32(1 / 65536)  # photometric.gaussian_blur's units, exact

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # jitter step ids, as photometric's ORDER holds them


def _compiled(fn: Callable[..., Any]) -> Any:
    """numba-compiled ``fn``, its machine code cached on disk (beside this file, else in the user's cache
    folder) so a process loads it in ~0.2 s instead of compiling for ~2 s; uncached where neither folder
    can be written (numba refuses ``cache=True`` there)."""
    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError:
        return njit(nogil=True)(fn)


@_compiled
def _level(v: np.float32) -> np.uint8:
    """clamp to [0, 255], then truncate: a uint8 conversion (photometric._to_levels)."""
    v = v if v > _ZERO else _ZERO
    v = v if v < _MAX_LEVEL else _MAX_LEVEL
    return np.uint8(np.floor(v))


@_compiled
def _grey(r: np.float32, g: np.float32, b: np.float32) -> np.float32:
    return np.floor((r * _W_R + g * _W_G) + b * _W_B)


@_compiled
def _brightness(a: np.ndarray, factor: float) -> None:
    for i in range(a.shape[0]):
        a[i] = _level(_f32(a[i]) * factor)


@_compiled
def _contrast(a: np.ndarray, factor: float) -> None:
    total = np.int64(0)
    for i in range(a.shape[0] // 3):
        total += np.int64(_grey(_f32(a[3 * i]), _f32(a[3 * i + 1]), _f32(a[3 * i + 2])))
    mean = _f32(np.float64(total) / (a.shape[0] // 3))
    shift = mean * (_ONE - factor)
    for i in range(a.shape[0]):
        a[i] = _level(_f32(a[i]) * factor + shift)


@_compiled
def _saturation(a: np.ndarray, factor: float) -> None:
    keep = _ONE - factor
    for i in range(a.shape[0] // 3):
        r, g, b = _f32(a[3 * i]), _f32(a[3 * i + 1]), _f32(a[3 * i + 2])
        grey = _grey(r, g, b) * keep
        a[3 * i] = _level(r * factor + grey)
        a[3 * i + 1] = _level(g * factor + grey)
        a[3 * i + 2] = _level(b * factor + grey)


@_compiled
def _hue(a: np.ndarray, factor: float, wrap: bool) -> None:
    """photometric.hue's arithmetic per pixel: ``min + chroma * (1 - t(phase))`` per channel."""
    turn = _SIX * factor
    for i in range(a.shape[0] // 3):
        r, g, b = _f32(a[3 * i]), _f32(a[3 * i + 1]), _f32(a[3 * i + 2])
        mx = r if r > g else g
        mx = mx if mx > b else b
        mn = r if r < g else g
        mn = mn if mn < b else b
        chroma = mx - mn
        if r == mx:  # ties go r, then g, then b (torchvision)
            sixths = g - b
        elif g == mx:
            sixths = b - r + _TWO * chroma
        else:
            sixths = r - g + _FOUR * chroma
        sixths = sixths / (chroma if chroma > _TINY_CHROMA else _TINY_CHROMA) + turn
        if wrap:
            sixths = sixths - np.floor(sixths * _A_SIXTH) * _SIX
        chroma, mn = chroma * _TO_BYTE, mn * _TO_BYTE
        for k in range(3):  # phases less 5: 0, -2, -4 for R, G, B
            t = np.abs(np.abs(sixths - _f32(2 * k)) - _THREE) - _ONE
            t = t if t > _ZERO else _ZERO
            t = t if t < _ONE else _ONE
            a[3 * i + k] = np.uint8(np.floor(t * chroma + mn))


@_compiled
def _grayscale(a: np.ndarray) -> None:
    for i in range(a.shape[0] // 3):
        grey = np.uint8(_grey(_f32(a[3 * i]), _f32(a[3 * i + 1]), _f32(a[3 * i + 2])))
        a[3 * i] = grey
        a[3 * i + 1] = grey
        a[3 * i + 2] = grey


@_compiled
def _blur(a: np.ndarray, height: int, width: int, taps: np.ndarray, reach: int) -> None:
    """photometric.gaussian_blur: rows, then columns, reflect padding, sixteenths of a level between."""
    centre = taps.shape[0] // 2
    row = width * 3
    sixteenths = np.empty(height * row, np.float32)
    padded = np.empty((width + 2 * reach) * 3, np.float32)
    acc = np.empty(row, np.float32)
    inner = padded[reach * 3 : reach * 3 + row]
    for y in range(height):
        src = a[y * row : (y + 1) * row]
        for x in range(row):
            inner[x] = _f32(src[x])
        for d in range(1, reach + 1):
            for k in range(3):
                padded[(reach - d) * 3 + k] = inner[d * 3 + k]
                padded[(reach + width - 1 + d) * 3 + k] = inner[(width - 1 - d) * 3 + k]
        for x in range(row):
            acc[x] = taps[centre] * inner[x]
        for d in range(1, reach + 1):
            tap = taps[centre - d]
            left = padded[(reach - d) * 3 : (reach - d) * 3 + row]
            right = padded[(reach + d) * 3 : (reach + d) * 3 + row]
            for x in range(row):
                acc[x] += tap * (left[x] + right[x])
        dst = sixteenths[y * row : (y + 1) * row]
        for x in range(row):
            dst[x] = (acc[x] * _FIRST_PASS + _ROUNDER) - _ROUNDER
    for y in range(height):
        here = sixteenths[y * row : (y + 1) * row]
        for x in range(row):
            acc[x] = taps[centre] * here[x]
        for d in range(1, reach + 1):
            tap = taps[centre - d]
            up = y - d if y >= d else d - y
            down = y + d if y + d < height else 2 * (height - 1) - y - d
            above = sixteenths[up * row : (up + 1) * row]
            below = sixteenths[down * row : (down + 1) * row]
            for x in range(row):
                acc[x] += tap * (above[x] + below[x])
        out = a[y * row : (y + 1) * row]
        for x in range(row):
            out[x] = np.uint8((acc[x] * _SECOND_PASS + _ROUNDER) - _ROUNDER)


@_compiled
def _solarize(a: np.ndarray, threshold: int) -> None:
    for i in range(a.shape[0]):
        a[i] = np.uint8(255) - a[i] if a[i] >= threshold else a[i]


@_compiled
def finish(
    a: np.ndarray, height: int, width: int, steps: np.ndarray, factors: np.ndarray, wrap: bool,
    grey: bool, taps: np.ndarray, reach: int, solarize: bool, threshold: int,
) -> None:  # fmt: skip
    """Finish one view in place: ``a`` is its channels-last levels, flat (``height * width * 3`` uint8).

    ``steps`` are the jitter step ids in the order they run (those to skip left out), ``factors`` the
    four jitter factors (float32); then grey, the blur (whole taps, ``reach`` 0 for none), solarize.
    """
    for step in steps:
        if step == BRIGHTNESS:
            _brightness(a, factors[BRIGHTNESS])
        elif step == CONTRAST:
            _contrast(a, factors[CONTRAST])
        elif step == SATURATION:
            _saturation(a, factors[SATURATION])
        else:
            _hue(a, factors[HUE], wrap)
    if grey:
        _grayscale(a)
    if reach > 0:
        _blur(a, height, width, taps, reach)
    if solarize:
        _solarize(a, threshold)


def precompile() -> None:
    """Compile (or load) every step now: a process that forks loader workers calls it first, so each
    worker inherits the machine code instead of compiling or loading it anew every epoch."""
    a, steps = np.zeros(2 * 2 * 3, dtype=np.uint8), np.arange(4, dtype=np.int64)
    taps = np.array([1, 4094, 1], dtype=np.float32)
    finish(a, 2, 2, steps, np.ones(4, dtype=np.float32), True, True, taps, 1, True, 128)
