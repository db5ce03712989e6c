"""Dense linear probe: how well a frozen encoder's last feature map separates per-pixel classes.

    python -m launch.tools.probe CHECKPOINT [--spec SPEC] --data DIR [--random-init] [--seed 0] [--epochs N]
                           [--size S] [--json]

The backbone runs once over every image in eval mode and its features are kept in memory. A 1x1
convolution on the (per-channel standardized) last feature map gives class logits, upsampled
bilinearly to the mask resolution and trained with cross-entropy (Adam, fixed seed) on the first 80%
of the image/mask pairs by sorted name; mIoU over the classes present in the held-out 20% (background
included) is the score. Only the 1x1 conv learns, so the score measures the features, and since
bilinear upsampling is linear this equals a per-pixel linear classifier on upsampled features.

``--random-init`` scores the same architecture at torchvision's (seeded) initialization: the
baseline pretraining must beat. Data layout: ``DIR/images/<stem>.{png,jpg,jpeg}`` and
``DIR/masks/<stem>.png`` (uint8 class ids, 255 = ignore), optionally ``DIR/classes.json`` with
``"classes"`` names, as written by :mod:`pixpro.demo_data`.

Exit codes: 0 done, 2 bad input (data folder, spec, weights), 3 checkpoint not found.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from launch.tools.args import Parser
from launch.tools.weights import WeightsError, encoder_or_random, report
from pixpro.augment import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IGNORE = 255
HELD_OUT = 0.2


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    masks: torch.Tensor  # int64 [N, S, S]
    names: list[str]


@dataclass
class ProbeResult:
    miou: float
    pixel_accuracy: float
    per_class_iou: dict[str, float]
    backbone: str
    weights: str
    step: int | None
    seed: int
    epochs: int
    image_size: int
    feature_size: list[int]
    train_images: int
    test_images: int
    classes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        step = f" step {self.step}" if self.step is not None else ""
        h, w = self.feature_size
        return (
            f"mIoU {100 * self.miou:.1f}% (pixel accuracy {100 * self.pixel_accuracy:.1f}%) {self.backbone} "
            f"{self.weights}{step}; {self.train_images} train / {self.test_images} held-out images at "
            f"{self.image_size}px, {h}x{w} features, {len(self.per_class_iou)} classes, "
            f"{self.epochs} epochs, seed {self.seed}"
        )


# ------------------------------------------------------------------------------------------- data
def find_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by file stem, sorted by stem; one-line errors for wrong folders."""
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (root, images_dir, masks_dir):
        if not d.is_dir():
            raise WeightsError(f"data folder {root} needs images/ and masks/ subfolders; {d} is missing")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() == ".png"}
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    stems = sorted(set(images) & set(masks))
    if len(stems) < 2:
        raise WeightsError(
            f"data folder {root}: {len(stems)} image/mask pairs with matching names "
            f"({len(images)} images, {len(masks)} masks); the probe needs at least 2"
        )
    return [(images[s], masks[s]) for s in stems]


def _read_pair(image_path: Path, mask_path: Path, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        with Image.open(mask_path) as m:
            mask = m if m.mode in ("L", "P") else m.convert("L")
            mask.load()
    except OSError as exc:
        raise WeightsError(f"cannot read {image_path.name} or its mask: {exc}") from None
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(image), np.asarray(mask)


def load_data(root: str | Path, size: int | None = None) -> tuple[Split, Split, list[str]]:
    """Train and held-out splits (last 20% by sorted name) and class names.

    Images keep their size when all share one square size and ``size`` is not given; otherwise every
    image is resized to ``size`` (default 224) square, masks with nearest neighbour.
    """
    root = Path(root)
    pairs = find_pairs(root)
    if size is None:
        with Image.open(pairs[0][0]) as im:
            first = im.size
        sizes = {first}
        for image_path, _ in pairs[1:]:
            with Image.open(image_path) as im:
                sizes.add(im.size)
        size = None if len(sizes) == 1 and first[0] == first[1] else 224
    arrays = [_read_pair(i, m, size) for i, m in pairs]
    images = torch.from_numpy(np.stack([a for a, _ in arrays])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([m for _, m in arrays]).astype(np.int64))
    names = [i.stem for i, _ in pairs]
    n_test = max(1, round(HELD_OUT * len(pairs)))
    n_train = len(pairs) - n_test
    present = masks[masks != IGNORE]
    if present.numel() == 0:
        raise WeightsError(f"data folder {root}: every mask pixel is {IGNORE} (ignore)")
    classes = _class_names(root, int(present.max()) + 1)
    train = Split(images[:n_train], masks[:n_train], names[:n_train])
    test = Split(images[n_train:], masks[n_train:], names[n_train:])
    return train, test, classes


def _class_names(root: Path, at_least: int) -> list[str]:
    try:
        names = [str(c) for c in json.loads((root / "classes.json").read_text())["classes"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    return names + [f"class{i}" for i in range(len(names), at_least)]


# ---------------------------------------------------------------------------------------- probing
def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float, ImageNet-normalized as the backbones were trained."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Last feature map ``[N, C, h, w]`` of ImageNet-normalized uint8 images, backbone in eval mode."""
    backbone.eval()
    out = [backbone(normalize(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(out).float()


def _logits(head: nn.Conv2d, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(head(feats), size=size, mode="bilinear", align_corners=False)


def train_head(
    feats: torch.Tensor, masks: torch.Tensor, num_classes: int, epochs: int, seed: int, lr: float = 1e-2
) -> nn.Conv2d:
    """The 1x1-conv classifier, trained with Adam on cross-entropy at mask resolution."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    head = nn.Conv2d(feats.shape[1], num_classes, 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    batch = 16
    steps = epochs * math.ceil(len(feats) / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    for _ in range(epochs):
        order = torch.randperm(len(feats), generator=generator)
        for i in range(0, len(feats), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(
                _logits(head, feats[idx], (masks.shape[-2], masks.shape[-1])), masks[idx], ignore_index=IGNORE
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head


@torch.no_grad()
def confusion(head: nn.Conv2d, feats: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[K, K]`` counts, rows = ground truth, columns = prediction; ignored pixels left out."""
    out = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in range(0, len(feats), 16):
        pred = _logits(head, feats[i : i + 16], (masks.shape[-2], masks.shape[-1])).argmax(1)
        gt = masks[i : i + 16]
        keep = gt != IGNORE
        out += torch.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes**2).view(
            num_classes, num_classes
        )
    return out


def miou(conf: torch.Tensor) -> tuple[float, dict[int, float]]:
    """Mean IoU over the classes present in the ground truth, and the IoU of each of them."""
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    present = [k for k in range(len(conf)) if conf[k].sum() > 0]
    ious = {k: float(tp[k] / union[k]) for k in present}
    return float(np.mean(list(ious.values()))), ious


def score_features(
    train_feats: torch.Tensor,
    train_masks: torch.Tensor,
    test_feats: torch.Tensor,
    test_masks: torch.Tensor,
    classes: Sequence[str],
    epochs: int = 30,
    seed: int = 0,
    lr: float = 1e-2,
) -> dict:
    """The probe on given feature maps: ``{"miou", "pixel_accuracy", "per_class_iou"}``.

    Features are standardized per channel with the training split's statistics, then the 1x1-conv
    head is trained on the training split and scored on the held-out one.
    """
    mean = train_feats.mean((0, 2, 3), keepdim=True)
    std = train_feats.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    train_feats, test_feats = (train_feats - mean) / std, (test_feats - mean) / std
    num_classes = len(classes)
    head = train_head(train_feats, train_masks, num_classes, epochs, seed, lr)
    conf = confusion(head, test_feats, test_masks, num_classes)
    score, ious = miou(conf)
    return {
        "miou": score,
        "pixel_accuracy": float(conf.diag().sum() / conf.sum().clamp_min(1)),
        "per_class_iou": {classes[k]: v for k, v in ious.items()},
    }


def probe(
    backbone: nn.Module,
    data: str | Path,
    seed: int = 0,
    epochs: int = 30,
    size: int | None = None,
    lr: float = 1e-2,
) -> dict:
    """Run the probe: ``{"miou", "pixel_accuracy", "per_class_iou", ...}`` (no weights metadata)."""
    train, test, classes = load_data(data, size)
    train_feats = extract_features(backbone, train.images)
    test_feats = extract_features(backbone, test.images)
    return {
        **score_features(train_feats, train.masks, test_feats, test.masks, classes, epochs, seed, lr),
        "image_size": int(train.images.shape[-1]),
        "feature_size": list(train_feats.shape[-2:]),
        "train_images": len(train.names),
        "test_images": len(test.names),
        "classes": classes,
    }


def run(
    checkpoint: str | None,
    spec: str | None,
    data: str | Path,
    random_init: bool = False,
    seed: int = 0,
    epochs: int = 30,
    size: int | None = None,
    backbone_name: str | None = None,
) -> ProbeResult:
    """Probe a checkpoint's online encoder, or the same architecture at random init."""
    if epochs < 1:
        raise WeightsError(f"--epochs must be at least 1, got {epochs}")
    if size is not None and size < 32:
        raise WeightsError(f"--size must be at least 32 pixels, got {size}")
    find_pairs(Path(data))  # a wrong data folder fails before any model is built
    backbone, name, weights, step = encoder_or_random(checkpoint, spec, random_init, seed, backbone_name)
    found = probe(backbone, data, seed, epochs, size)
    return ProbeResult(backbone=name, weights=weights, step=step, seed=seed, epochs=epochs, **found)


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m launch.tools.probe", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="checkpoint store URL/folder, run folder or .pt file")
    parser.add_argument("--spec", help="the run's spec (default: spec.json beside the run)")
    parser.add_argument("--data", required=True, type=Path, help="folder with images/ and masks/")
    parser.add_argument("--random-init", action="store_true", help="score the untrained architecture")
    parser.add_argument("--backbone", help="architecture for --random-init without a spec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the linear head")
    parser.add_argument("--size", type=int, default=None, help="resize images to SxS (default: as stored)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    return report(
        lambda: run(
            args.checkpoint,
            args.spec,
            args.data,
            args.random_init,
            args.seed,
            args.epochs,
            args.size,
            args.backbone,
        ),
        args.json,
        ProbeResult.summary,
    )


if __name__ == "__main__":
    sys.exit(main())
