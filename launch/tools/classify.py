"""Image classification on a frozen encoder: a linear classifier or a weighted kNN, top-1/top-5 held out.

    python -m launch.tools.classify CHECKPOINT --data DIR --task linear|knn [--spec SPEC] [--random-init]
                                    [--seed 0] [--size S] [--epochs N] [--views V] [--json]

Both read the encoder's last feature map, global-average-pooled (the official code's ``reduce`` head),
with the backbone frozen in eval mode, on a labelled folder or pack (:mod:`launch.tools.labelled`).

**linear** follows PixPro's ``main_linear.py`` (the MoCo linear-evaluation recipe) where it applies: one
fully connected layer on the pooled features, cross-entropy, SGD with momentum 0.9 and no weight decay,
learning rate 30 at batch 256 (scaled linearly with the batch), cosine decay per step, 100 epochs;
training images through RandomResizedCrop + horizontal flip, held-out ones resized to 256/224 of the
crop and centre-cropped; top-1/top-5 on the held-out split. Scaled down so it runs in a minute on a CPU:
the frozen backbone sees each training image in ``--views`` augmented crops (4) once, and the epochs
cycle over those cached features instead of drawing a new crop every epoch (the official code re-runs
the backbone on fresh crops every epoch: 100 backbone passes over the data); the crop is the images'
own size up to 224 (the demo scenes are 160 px); the classifier starts at N(0, 0.01) as MoCo's does.
BatchNorm stays in eval mode (frozen statistics), as MoCo's linear evaluation keeps it.

**knn** is the weighted kNN monitor of InstDisc/DINO: L2-normalised pooled features of the held-out
images vote among their k = 20 nearest training images by cosine similarity, each vote weighted by
exp(similarity / 0.07); no training, centre crops only, so it takes one pass over the data.

``--random-init`` scores the untrained architecture (torchvision's seeded initialization), the baseline
pretraining must beat. Runs on the GPU when one is visible. Exit codes: 0 done, 2 bad input, 3 checkpoint
not found.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from launch.tools.args import Parser
from launch.tools.labelled import LabelledData, LabelledSplit, load_labelled
from launch.tools.probe import normalize
from launch.tools.weights import WeightsError, encoder_or_random, report


@dataclass(frozen=True)
class LinearRecipe:
    """main_linear.py's optimizer and length; ``views`` is this CPU-sized version's feature cache."""

    lr: float = 30.0  # at batch 256, scaled linearly for a smaller batch
    batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 100
    views: int = 4


LINEAR = LinearRecipe()
KNN_K = 20
KNN_TEMPERATURE = 0.07
MAX_SIZE = 224


@dataclass
class ClassifyResult:
    task: str
    top1: float
    top5: float
    backbone: str
    weights: str
    step: int | None
    seed: int
    image_size: int
    feature_dim: int
    train_images: int
    test_images: int
    classes: list[str]
    layout: str
    device: str
    settings: dict = field(default_factory=dict)

    def table(self) -> str:
        step = "-" if self.step is None else str(self.step)
        return "\n".join(
            [
                "| task | weights | step | top-1 % | top-5 % | train | held-out | classes | crop | seed |",
                "|---|---|---|---|---|---|---|---|---|---|",
                f"| {self.task} | {self.backbone} {self.weights} | {step} | {100 * self.top1:.1f} | "
                f"{100 * self.top5:.1f} | {self.train_images} | {self.test_images} | {len(self.classes)} | "
                f"{self.image_size} | {self.seed} |",
            ]
        )


# ------------------------------------------------------------------------------------------ features
class Crops(Dataset):
    """One split's images as uint8 crops: augmented (seeded per image and view) or centre crops."""

    def __init__(self, split: LabelledSplit, size: int, seed: int, view: int | None) -> None:
        self.split, self.seed, self.view = split, seed, view
        if view is None:
            self.transform = v2.Compose(
                [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
            )
        else:
            self.transform = v2.Compose(
                [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
            )

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.split.images.load(int(self.split.indices[i]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1000 + (self.view or 0)) * 10_000_019 + i)
            return self.transform(image)


@torch.no_grad()
def pooled_features(
    backbone: nn.Module, crops: Dataset, device: torch.device, workers: int = 0
) -> torch.Tensor:
    """``[N, C]`` global-average-pooled last feature maps, on the CPU."""
    backbone.eval().to(device)
    loader = DataLoader(crops, batch_size=64, num_workers=workers)
    return torch.cat([backbone(normalize(x).to(device)).float().mean((2, 3)).cpu() for x in loader])


def image_size(data: LabelledData) -> int:
    """The crop: the first training image's shorter side, at most 224 (the official crop)."""
    first = data.train.images.load(int(data.train.indices[0]))
    return min(MAX_SIZE, int(min(first.shape[-2:])))


# --------------------------------------------------------------------------------------- classifiers
def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (top-5 is top-K when there are fewer than 5 classes)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return float(hits[:, 0].float().mean()), float(hits.any(1).float().mean())


def train_linear(
    views: list[torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    epochs: int,
    seed: int,
    device: torch.device,
) -> nn.Linear:
    """The fully connected layer: SGD (momentum 0.9, no weight decay), cosine per step, epoch e on view
    ``e % len(views)`` of every training image; learning rate 30 scaled to the batch (256 or fewer)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    batch = min(LINEAR.batch, n)
    head = nn.Linear(views[0].shape[1], num_classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    lr = LINEAR.lr * batch / LINEAR.batch
    optimizer = torch.optim.SGD(head.parameters(), lr, momentum=LINEAR.momentum, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(n / batch))
    labels = labels.to(device)
    for epoch in range(epochs):
        feats = views[epoch % len(views)].to(device)
        order = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


def knn_scores(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int, k: int, t: float
) -> torch.Tensor:
    """``[M, K]`` class votes: the k most cosine-similar training images, weighted by exp(sim / t)."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    out = []
    for chunk in test.split(1024):
        sim, idx = (chunk @ train.T).topk(min(k, len(train)), dim=1)
        votes = F.one_hot(train_labels[idx], num_classes).float() * (sim / t).exp()[..., None]
        out.append(votes.sum(1))
    return torch.cat(out)


# -------------------------------------------------------------------------------------------- running
def evaluate(
    backbone: nn.Module,
    data: LabelledData,
    task: str,
    seed: int = 0,
    size: int | None = None,
    epochs: int = LINEAR.epochs,
    views: int = LINEAR.views,
    device: torch.device | None = None,
    workers: int = 0,
) -> dict:
    """Score ``backbone`` on ``data``: ``{"top1", "top5", ...}`` (no weights metadata)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = size or image_size(data)
    test_labels = torch.from_numpy(data.test.labels)
    train_labels = torch.from_numpy(data.train.labels)
    test = pooled_features(backbone, Crops(data.test, size, seed, None), device, workers)
    k = len(data.classes)
    if task == "knn":
        train = pooled_features(backbone, Crops(data.train, size, seed, None), device, workers)
        scores = knn_scores(train, train_labels, test, k, KNN_K, KNN_TEMPERATURE)
        settings: dict = {"k": KNN_K, "temperature": KNN_TEMPERATURE}
    else:
        cached = [
            pooled_features(backbone, Crops(data.train, size, seed, v), device, workers) for v in range(views)
        ]
        head = train_linear(cached, train_labels, k, epochs, seed, device)
        with torch.no_grad():
            scores = head(test.to(device)).cpu()
        batch = min(LINEAR.batch, len(train_labels))
        settings = asdict(replace(LINEAR, epochs=epochs, views=views, batch=batch))  # lr: at batch 256
    top1, top5 = topk_accuracy(scores, test_labels)
    return {
        "top1": top1,
        "top5": top5,
        "image_size": size,
        "feature_dim": int(test.shape[1]),
        "train_images": len(data.train),
        "test_images": len(data.test),
        "classes": data.classes,
        "layout": data.layout,
        "device": device.type,
        "settings": settings,
    }


def run(
    checkpoint: str | None,
    spec: str | None,
    data: str,
    task: str,
    random_init: bool = False,
    seed: int = 0,
    size: int | None = None,
    epochs: int = LINEAR.epochs,
    views: int = LINEAR.views,
    backbone_name: str | None = None,
    workers: int = 0,
) -> ClassifyResult:
    """Evaluate a checkpoint's online encoder, or the same architecture at random init."""
    if task not in ("linear", "knn"):
        raise WeightsError(f"--task {task}: must be linear or knn")
    if epochs < 1 or views < 1:
        raise WeightsError(f"--epochs and --views must be at least 1, got {epochs} and {views}")
    if size is not None and size < 32:
        raise WeightsError(f"--size must be at least 32 pixels, got {size}")
    labelled = load_labelled(data)  # a wrong data folder fails before any model is built
    backbone, name, weights, step = encoder_or_random(checkpoint, spec, random_init, seed, backbone_name)
    found = evaluate(backbone, labelled, task, seed, size, epochs, views, workers=workers)
    return ClassifyResult(task=task, backbone=name, weights=weights, step=step, seed=seed, **found)


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m launch.tools.classify", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="checkpoint store URL/folder, run folder or .pt file")
    parser.add_argument("--spec", help="the run's spec (default: spec.json beside the run)")
    parser.add_argument(
        "--data", required=True, help="labelled folder or pack (class sub-folders) or demo scenes"
    )
    parser.add_argument("--task", default="linear", help="linear or knn")
    parser.add_argument("--random-init", action="store_true", help="score the untrained architecture")
    parser.add_argument("--backbone", help="architecture for --random-init without a spec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None, help="crop size (default: the images' own, <= 224)")
    parser.add_argument("--epochs", type=int, default=LINEAR.epochs, help="linear: epochs of the classifier")
    parser.add_argument("--views", type=int, default=LINEAR.views, help="linear: augmented crops per image")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the backbone passes")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "json")}
    options["backbone_name"] = options.pop("backbone")
    return report(lambda: run(args.checkpoint, **options), args.json, ClassifyResult.table)


if __name__ == "__main__":
    sys.exit(main())
