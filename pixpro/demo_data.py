"""Synthetic cluttered scenes with per-pixel class masks, for the demo run and the dense probe.

Each object class has its own shape and texture, so pixel-level features can tell classes apart while
a single global image embedding cannot (scenes mix classes). Colours are drawn per object,
independently of the class: as in natural images, colour is a nuisance that pretraining's colour
jitter is meant to discard, and a probe cannot score well from patch colour statistics alone
(class-coded palettes let a fixed colour/variance feature beat every learned one). Backgrounds are
cluttered with textures no object uses, so "not background" is not trivially "has any texture".
Everything is drawn with vectorized numpy from one generator per image, so image ``i`` depends only
on ``(seed, i)``.

Layout: ``root/images/00000.png`` (RGB), ``root/masks/00000.png`` (uint8 class id per pixel, 0 =
background) and ``root/classes.json`` (class names by id plus the generation parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixpro.data import DatasetError

FORMAT = "pixpro-demo"
VERSION = 2  # bump whenever rendering changes, so stale datasets are not silently reused
CLASS_NAMES: tuple[str, ...] = ("background", "disc", "square", "triangle", "ring", "star")
TEXTURE_NAMES: tuple[str, ...] = ("none", "stripes", "checker", "dots", "gradient", "waves")
_MIN_CONTRAST = 90.0  # RGB distance between an object's two colours, so its texture stays visible
_TWO_PI = np.float32(2 * np.pi)

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class DemoInfo:
    """Where a generated demo dataset lives and how it was made."""

    root: Path
    images_dir: Path
    masks_dir: Path
    class_names: tuple[str, ...]
    num_images: int
    image_size: int
    seed: int
    created: bool  # False when an identical dataset was already there

    @property
    def num_classes(self) -> int:
        """Number of ids including background (masks hold values in ``range(num_classes)``)."""
        return len(self.class_names)

    def mask_path(self, image_path: str | Path) -> Path:
        """The mask that belongs to an image file of this dataset."""
        return self.masks_dir / Path(image_path).name


# ---------------------------------------------------------------------------------------- shapes
def _disc(u: Array, v: Array) -> Array:
    return u * u + v * v <= 1.0


def _square(u: Array, v: Array) -> Array:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _triangle(u: Array, v: Array) -> Array:
    inside = np.ones(u.shape, dtype=bool)
    for angle in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6):  # edge normals; circumradius 1
        inside &= u * np.float32(np.cos(angle)) + v * np.float32(np.sin(angle)) <= 0.5
    return inside


def _ring(u: Array, v: Array) -> Array:
    rho2 = u * u + v * v
    return (rho2 <= 1.0) & (rho2 >= 0.25)


def _star(u: Array, v: Array) -> Array:
    phase = (np.arctan2(v, u) * np.float32(5 / (2 * np.pi))) % 1.0
    return np.hypot(u, v) <= 0.45 + 0.55 * np.abs(2.0 * phase - 1.0)


# Indexed by class id; entry 0 (background) is never drawn.
_SHAPES: tuple[Callable[[Array, Array], Array], ...] = (_disc, _disc, _square, _triangle, _ring, _star)


# -------------------------------------------------------------------------------------- textures
# Each maps object-frame pixel offsets (u, v) and radius r to a blend weight in [0, 1].
def _stripes(rng: np.random.Generator, u: Array, v: Array, r: float) -> Array:
    period = rng.uniform(5.0, 9.0)
    return (np.sin(u * np.float32(2 * np.pi / period)) > 0).astype(np.float32)


def _checker(rng: np.random.Generator, u: Array, v: Array, r: float) -> Array:
    period = np.float32(rng.uniform(4.0, 7.0))
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def _dots(rng: np.random.Generator, u: Array, v: Array, r: float) -> Array:
    period = np.float32(rng.uniform(6.0, 9.0))
    du = u % period - period / 2
    dv = v % period - period / 2
    return (du * du + dv * dv < (0.32 * period) ** 2).astype(np.float32)


def _gradient(rng: np.random.Generator, u: Array, v: Array, r: float) -> Array:
    return np.clip(0.5 + 0.5 * u / np.float32(r), 0.0, 1.0)


def _waves(rng: np.random.Generator, u: Array, v: Array, r: float) -> Array:
    period = np.float32(rng.uniform(6.0, 10.0))
    bend = 0.3 * period * np.sin(u * (_TWO_PI / (2 * period)))
    return 0.5 + 0.5 * np.sin((v + bend) * (_TWO_PI / period))


_TEXTURES = (_stripes, _stripes, _checker, _dots, _gradient, _waves)


# ------------------------------------------------------------------------------------- rendering
def _upsample(grid: Array, size: int) -> Array:
    """Bilinear upsampling of a small ``[c, c, 3]`` grid to ``[size, size, 3]``."""
    cells = grid.shape[0]
    pos = np.linspace(0, cells - 1, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), cells - 2)
    f = (pos - i0)[:, None, None]
    rows = grid[i0] * (1 - f) + grid[i0 + 1] * f
    f = f.reshape(1, size, 1)
    return rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f


def _background(rng: np.random.Generator, yy: Array, xx: Array) -> Array:
    """Smooth colour field + noise + speckled blobs + thin lines: clutter with no object texture."""
    size = yy.shape[0]
    image = _upsample(rng.uniform(20, 235, (4, 4, 3)).astype(np.float32), size)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(4, 14))
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(0.05, 0.18) * size
        harmonics = rng.uniform(0, 2 * np.pi, 2)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        angle = np.arctan2(yy - np.float32(cy), xx - np.float32(cx))
        wobble = 1 + 0.25 * np.sin(3 * angle + harmonics[0]) + 0.15 * np.sin(5 * angle + harmonics[1])
        inside = np.hypot(yy - np.float32(cy), xx - np.float32(cx)) < radius * wobble
        speckle = rng.standard_normal((int(inside.sum()), 3), dtype=np.float32) * np.float32(35)
        image[inside] = colour + speckle
    for _ in range(rng.integers(3, 11)):
        (x0, y0), (x1, y1) = rng.uniform(-0.2 * size, 1.2 * size, (2, 2))
        half_width = rng.uniform(0.5, 1.6)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        dx, dy = np.float32(x1 - x0), np.float32(y1 - y0)
        t = np.clip(((xx - np.float32(x0)) * dx + (yy - np.float32(y0)) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.hypot(xx - np.float32(x0) - t * dx, yy - np.float32(y0) - t * dy)
        image[dist <= half_width] = colour
    return image


def _object_colours(rng: np.random.Generator) -> Array:
    """Two random colours ``[2, 3]`` at least ``_MIN_CONTRAST`` apart: the first of 8 candidates that
    is, else (about one object in a million) the cube corner farthest from the first colour."""
    first = rng.uniform(0, 255, 3).astype(np.float32)
    candidates = rng.uniform(0, 255, (8, 3)).astype(np.float32)
    far = np.linalg.norm(candidates - first, axis=1) >= _MIN_CONTRAST
    corner = np.where(first < 127.5, np.float32(255), np.float32(0))
    second = candidates[int(np.argmax(far))] if far.any() else corner
    return np.stack([first, second])


def _draw_objects(rng: np.random.Generator, image: Array, mask: Array, yy: Array, xx: Array) -> None:
    """Paint 1-5 textured objects in order; later ones occlude earlier ones in image and mask."""
    size = mask.shape[0]
    for _ in range(rng.integers(1, 6)):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        radius = rng.uniform(0.1, 0.28) * size
        cx, cy = rng.uniform(0.12, 0.88, 2) * size
        theta = rng.uniform(0, 2 * np.pi)
        colours = _object_colours(rng)
        # Work in the object's bounding window only: objects are small, scenes are not.
        y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, size)
        x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, size)
        dy, dx = yy[y0:y1, x0:x1] - np.float32(cy), xx[y0:y1, x0:x1] - np.float32(cx)
        cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        weight = _TEXTURES[cls](rng, u, v, radius)
        inside = _SHAPES[cls](u / np.float32(radius), v / np.float32(radius))
        patch = colours[0] + weight[..., None] * (colours[1] - colours[0])
        image[y0:y1, x0:x1][inside] = patch[inside]
        mask[y0:y1, x0:x1][inside] = cls


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """Generator for one scene: image ``index`` is the same whatever the dataset size."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def render_scene(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    """One scene: uint8 RGB image ``[size, size, 3]`` and uint8 class-id mask ``[size, size]``."""
    coords = np.arange(size, dtype=np.float32) + np.float32(0.5)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    image = _background(rng, yy, xx)
    mask = np.zeros((size, size), dtype=np.uint8)
    _draw_objects(rng, image, mask, yy, xx)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(3)  # sensor noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask


# ------------------------------------------------------------------------------------------ disk
def _params(num_images: int, image_size: int, seed: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
    }


def _file_names(num_images: int) -> list[str]:
    return [f"{i:05d}.png" for i in range(num_images)]


def _existing_dataset(root: Path, params: dict[str, Any]) -> bool:
    """True if ``root`` already holds this exact dataset; False if absent/empty; else refuse."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise DatasetError(f"demo dataset path {root} exists and is not a folder")
    if not any(root.iterdir()):
        return False
    try:
        meta = json.loads((root / "classes.json").read_text())
        found = {key: meta[key] for key in params}
    except (OSError, ValueError, KeyError, TypeError):
        raise DatasetError(
            f"refusing to write a demo dataset into {root}: folder is not empty "
            "and holds no pixpro demo dataset"
        ) from None
    if found != params:
        described = ", ".join(
            f"{key}={found[key]}" for key in ("num_images", "image_size", "seed", "version")
        )
        raise DatasetError(
            f"{root} holds a different demo dataset ({described}); delete it or choose another folder"
        )
    names = _file_names(params["num_images"])
    for sub in ("images", "masks"):
        present = set(os.listdir(root / sub)) if (root / sub).is_dir() else set()
        missing = len(set(names) - present)
        if missing:
            raise DatasetError(
                f"{root} holds an incomplete demo dataset ({missing} files missing "
                f"from {sub}/); delete it and generate again"
            )
    return True


def _write(folder: Path, params: dict[str, Any]) -> None:
    """Render every scene into ``folder``; classes.json goes last, marking the dataset complete."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for index, name in enumerate(_file_names(params["num_images"])):
        image, mask = render_scene(scene_rng(params["seed"], index), params["image_size"])
        Image.fromarray(image).save(folder / "images" / name, compress_level=1)
        Image.fromarray(mask).save(folder / "masks" / name, compress_level=1)
    meta = {**params, "classes": list(CLASS_NAMES), "textures": list(TEXTURE_NAMES)}
    (folder / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")


def _publish(staging: Path, root: Path) -> None:
    """Move a finished dataset into place; atomic when ``root`` is absent or an empty folder."""
    try:
        staging.rename(root)
        return
    except OSError:
        if not root.is_dir() or any(root.iterdir()):
            raise
    for name in ("images", "masks", "classes.json"):  # e.g. root is a mount point
        shutil.move(staging / name, root / name)


def demo_dataset_exists(root: str | Path, num_images: int, image_size: int, seed: int) -> bool:
    """True if ``root`` holds this exact demo dataset, False if it is absent or empty; raises
    ``DatasetError`` (the generator's own refusal) for anything else, e.g. one made with other settings."""
    return _existing_dataset(Path(root), _params(int(num_images), int(image_size), int(seed)))


def generate_demo_dataset(
    root: str | Path, num_images: int = 512, image_size: int = 160, seed: int = 0
) -> DemoInfo:
    """Write the demo dataset to ``root`` unless that exact dataset is already there.

    Generation happens in a hidden sibling folder that is renamed into place at the end, so an
    interrupted run leaves ``root`` untouched and concurrent runs (several tasks of one job) agree.
    Refuses (``DatasetError``) to write into a non-empty folder holding anything else.
    """
    if num_images < 1 or image_size < 16 or seed < 0:
        raise DatasetError(
            f"need num_images >= 1, image_size >= 16, seed >= 0; got {num_images}, {image_size}, {seed}"
        )
    root = Path(root)
    num_images, image_size, seed = int(num_images), int(image_size), int(seed)
    params = _params(num_images, image_size, seed)
    info = DemoInfo(root, root / "images", root / "masks", CLASS_NAMES, num_images, image_size, seed, False)
    if _existing_dataset(root, params):
        return info
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(staging, params)
        try:
            _publish(staging, root)
        except OSError:
            if not _existing_dataset(root, params):  # another process may have won the race
                raise
            return info
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(info, created=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pixpro.demo_data ROOT [--num-images N] [--size S] [--seed K]``."""
    parser = argparse.ArgumentParser(prog="python -m pixpro.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="output folder (created; must be empty or absent)")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--size", type=int, default=160, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        info = generate_demo_dataset(args.root, args.num_images, args.size, args.seed)
    except DatasetError as error:
        parser.exit(2, f"error: {error}\n")
    action = "wrote" if info.created else "already present:"
    print(
        f"{action} {info.num_images} images of {info.image_size}px, {info.num_classes - 1} object "
        f"classes, in {info.root} ({time.perf_counter() - start:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
