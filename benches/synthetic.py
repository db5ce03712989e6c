"""Generated JPEGs whose decode cost is ImageNet's: smooth colour fields under noise, quality 90.

JPEG decode time follows the entropy, so the noise is set to give ImageNet's mean file (~110 KB) at the
sizes a bench uses; the benches that read or decode images share this one recipe.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def noisy_jpeg(rng: np.random.Generator, height: int, width: int, noise: float) -> bytes:
    """One JPEG: three sinusoid colour fields with Gaussian noise of ``noise`` (x 60 levels)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / width
    a, b, c = rng.random(3) * 6
    base = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy + a)], -1)
    img = np.clip((base + rng.normal(0, noise, (height, width, 3))) * 60 + 128, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()
