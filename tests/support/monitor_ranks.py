"""The kNN monitor on a seeded random-init resnet18, in one process or in each rank under torchrun.

    python -m tests.support.monitor_ranks DATA OUT.json [K]

Rank 0 writes ``{"top1", "top5", "world"}``; a lone process adds ``reference``: the same images scored
by ``pixpro eval --task knn``'s own functions (launch.tools.classify), which the monitor must equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from launch.collectives import Collectives, DistEnv
from launch.monitor import KnnMonitor
from launch.tools.classify import Crops, knn_scores, pooled_features, topk_accuracy
from pixpro.model import build_backbone
from schemas import MonitorSpec

CROP = 64


def main(data: str, out: str, k: int) -> None:
    env = DistEnv.from_environ()
    collectives = Collectives.start(env, torch.device("cpu"), 120.0)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", False)
    spec = MonitorSpec(data=data, every_steps=1, train_samples=31, test_samples=9, k=k)
    monitor = KnnMonitor(spec, CROP, collectives, torch.device("cpu"))
    top1, top5 = monitor.evaluate(backbone, 0)
    result: dict = {"top1": top1, "top5": top5, "world": collectives.world_size}
    if collectives.world_size == 1:
        cpu = torch.device("cpu")
        train = pooled_features(backbone, Crops(monitor.train, CROP, 0, None), cpu)
        test = pooled_features(backbone, Crops(monitor.test, CROP, 0, None), cpu)
        labels = torch.from_numpy(monitor.train.labels)
        scores = knn_scores(train, labels, test, monitor.num_classes, k, spec.temperature)
        result["reference"] = list(topk_accuracy(scores, torch.from_numpy(monitor.test.labels)))
    if collectives.rank == 0:
        Path(out).write_text(json.dumps(result))
    collectives.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 20)
