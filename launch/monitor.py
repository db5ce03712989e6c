"""The kNN monitor: ``pixpro eval --task knn`` on the online backbone, inside the training job.

Every ``monitor.every_steps`` steps (or ``every_epochs`` epochs) each rank embeds its share of the
monitor's labelled images (centre crops at ``data.crop_size``, decoded once and kept in memory), the
held-out features are gathered, each rank finds the k nearest of its own training images, and the
candidates of all ranks are merged into the global top k: the same votes one process would count.

It reads the training state and changes none of it: the backbone runs in eval mode (BatchNorm keeps its
running statistics) under ``torch.no_grad``, its modules' train flags are put back, no random number is
drawn (centre crops, no DataLoader) and every global generator is restored anyway, and the sampler is
never touched. A run ends bitwise the same with the monitor on or off (CPU).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from launch import heartbeat
from launch.collectives import Collectives
from launch.rng import capture_rng, restore_rng
from launch.tools.classify import Crops, topk_accuracy
from launch.tools.labelled import LabelledSplit, load_labelled
from launch.tools.weights import WeightsError
from pixpro.augment import IMAGENET_MEAN, IMAGENET_STD
from pixpro.data import DatasetError
from schemas.spec.operations import MonitorSpec

log = logging.getLogger("pixpro.monitor")

BATCH = 128  # images per forward pass
CHUNK = 1024  # held-out rows per similarity block (bounds the [rows, train] matrix)


def spread(split: LabelledSplit, count: int) -> LabelledSplit:
    """At most ``count`` images of ``split``, evenly spaced over it (its class order gives every class
    its share); deterministic, no random draw."""
    n = len(split)
    if count >= n:
        return split
    picked = np.linspace(0, n - 1, count).round().astype(np.int64)
    return LabelledSplit(split.images, split.indices[picked], split.labels[picked])


def shard(split: LabelledSplit, rank: int, world: int) -> LabelledSplit:
    """Rank ``rank``'s positions ``rank, rank + world, ...`` of ``split``."""
    return LabelledSplit(split.images, split.indices[rank::world], split.labels[rank::world])


class KnnMonitor:
    """One rank's part of the monitor: its shard of the images, and the collective kNN."""

    def __init__(
        self,
        spec: MonitorSpec,
        crop_size: int,
        collectives: Collectives,
        device: torch.device,
        storage_options: dict[str, Any] | None = None,
        amp_dtype: torch.dtype | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.spec, self.crop_size, self.collectives, self.device = spec, crop_size, collectives, device
        self.amp_dtype, self.memory_format = amp_dtype, memory_format
        try:
            data = load_labelled(spec.data, storage_options)
        except WeightsError as exc:
            raise DatasetError(f"monitor.data: {exc}") from None
        self.num_classes = len(data.classes)
        self.train = spread(data.train, spec.train_samples)
        self.test = spread(data.test, spec.test_samples)
        rank, world = collectives.rank, collectives.world_size
        self.my_train, self.my_test = shard(self.train, rank, world), shard(self.test, rank, world)
        self.test_sizes = [len(range(r, len(self.test), world)) for r in range(world)]
        self._crops: tuple[torch.Tensor, torch.Tensor] | None = None  # (train, test) uint8, decoded once
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def every(self, steps_per_epoch: int) -> int:
        return self.spec.every_steps or (self.spec.every_epochs or 1) * steps_per_epoch

    def evaluate(self, backbone: nn.Module, step: int) -> tuple[float, float]:
        """(top-1, top-5) of the held-out images, the same on every rank; every rank must call it."""
        rng = capture_rng()
        modes = [(m, m.training) for m in backbone.modules()]
        backbone.eval()
        try:
            with torch.no_grad():
                train_crops, test_crops = self.crops(step)
                test = self._gather_rows(self.embed(backbone, test_crops, step))
                train = self.embed(backbone, train_crops, step)
                scores = self.votes(train, torch.from_numpy(self.my_train.labels).to(self.device), test)
            return topk_accuracy(scores.cpu(), torch.from_numpy(self.test.labels))
        finally:
            for module, mode in modes:
                module.training = mode
            restore_rng(rng)

    def crops(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's centre crops as uint8 ``[N, 3, S, S]``, decoded at the first evaluation only."""
        if self._crops is None:
            self._crops = (self._decode(self.my_train, step), self._decode(self.my_test, step))
        return self._crops

    def _decode(self, split: LabelledSplit, step: int) -> torch.Tensor:
        crops = Crops(split, self.crop_size, 0, None)
        out = torch.empty(len(split), 3, self.crop_size, self.crop_size, dtype=torch.uint8)
        for i in range(len(split)):
            if i % BATCH == 0:
                heartbeat.beat(step, "monitor")  # a slow first decode is progress, not a hang
            out[i] = crops[i]
        return out

    def embed(self, backbone: nn.Module, crops: torch.Tensor, step: int) -> torch.Tensor:
        """``[N, C]`` L2-normalised, global-average-pooled last feature maps, float32 on the device."""
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        feats = []
        for start in range(0, max(len(crops), 1), BATCH):  # an empty shard still learns the width
            heartbeat.beat(step, "monitor")
            x = crops[start : start + BATCH].to(self.device, non_blocking=True)
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            with autocast:
                feats.append(backbone(x).float().mean((2, 3)))
        return F.normalize(torch.cat(feats), dim=1)

    def _gather_rows(self, mine: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in the order of the whole split (rank r holds positions r, r + world...)."""
        world = self.collectives.world_size
        if world == 1:
            return mine
        most = max(self.test_sizes)
        padded = torch.zeros(most, mine.shape[1], device=mine.device, dtype=mine.dtype)
        padded[: len(mine)] = mine
        parts = self.collectives.all_gather(padded)
        out = torch.empty(sum(self.test_sizes), mine.shape[1], device=mine.device, dtype=mine.dtype)
        for r, (part, size) in enumerate(zip(parts, self.test_sizes, strict=True)):
            out[r::world] = part[:size]
        return out

    def votes(self, train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        """``[M, classes]`` weighted votes of the k nearest training images over all ranks."""
        k, t = self.spec.k, self.spec.temperature
        sims, labels = [], []
        for chunk in test.split(CHUNK):  # each rank: the k nearest of its own training images
            top = (chunk @ train.T).topk(min(k, len(train)), dim=1)
            sims.append(top.values)
            labels.append(train_labels[top.indices])
        sim, lab = torch.cat(sims), torch.cat(labels)
        if sim.shape[1] < k:  # fewer training images than k here: padding that never wins a vote
            pad = k - sim.shape[1]
            sim = torch.cat([sim, sim.new_full((len(sim), pad), -torch.inf)], 1)
            lab = torch.cat([lab, lab.new_zeros((len(lab), pad))], 1)
        if self.collectives.world_size > 1:  # merged: the global k nearest among every rank's k
            sim = torch.cat(self.collectives.all_gather(sim), 1)
            lab = torch.cat(self.collectives.all_gather(lab), 1)
        top = sim.topk(min(k, len(self.train)), dim=1)
        weights = (top.values / t).exp()
        return (F.one_hot(lab.gather(1, top.indices), self.num_classes).float() * weights[..., None]).sum(1)
