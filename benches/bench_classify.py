"""Image-level read-outs of the demo scenes: linear classification and weighted kNN, random init vs PixPro.

The same pretraining as ``bench_probe.py`` (resnet18, 512 demo scenes at 160 px, 600 steps of the real
trainer), or an existing run given with ``--run``; each encoder is read out on 512 *other* scenes
(seed 1), each labelled by its dominant object class (:mod:`launch.tools.labelled`), every fifth scene
of each class held out. Random init is scored at three initialization seeds, PixPro at three evaluation
seeds (crops, classifier init and order), as the dense probe's table does; the majority class of the
held-out split is the floor.

    python benches/bench_classify.py                       # pretrains first (51 min here, fp32, shared)
    python benches/bench_classify.py --run DIR [--spec S]  # an existing run's newest checkpoint
    python benches/bench_classify.py --quick               # a smoke version (16 steps, small data)

Prints a markdown table (top-1/top-5 % and wall seconds per read-out).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_probe import FULL, QUICK, RECIPE, make_spec, start_pretraining

from launch.tools.classify import evaluate
from launch.tools.labelled import load_labelled
from launch.tools.weights import build_encoder, load_encoder
from pixpro.demo_data import generate_demo_dataset

EVAL_IMAGES = {False: 512, True: 96}
"""Scenes read out (20% held out): twice the dense probe's, as one label per scene is far less signal."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke version (too short to learn)")
    parser.add_argument("--run", type=Path, default=None, help="an existing pretraining run folder")
    parser.add_argument("--spec", type=Path, default=None, help="its spec (default: spec.json in --run)")
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()
    s = dict(QUICK if args.quick else FULL)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    rows: list[tuple[str, str, str, float, float, float]] = []

    def add(label: str, task: str, backbone: torch.nn.Module, data, seed: int, step: str) -> None:
        t = time.perf_counter()
        found = evaluate(backbone, data, task, seed=seed, device=torch.device("cpu"))
        rows.append((label, task, step, 100 * found["top1"], 100 * found["top5"], time.perf_counter() - t))
        print(f"{label} {task} seed {seed}: top-1 {100 * found['top1']:.1f}%", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="pixpro-bench-classify-") as tmp:
        work = args.work or Path(tmp)
        eval_root = work / "classify-data"
        generate_demo_dataset(eval_root, EVAL_IMAGES[args.quick], s["image_size"], seed=1)
        data = load_labelled(eval_root)
        run_dir, spec = args.run, args.spec
        if run_dir is None:
            train_data = work / "pretrain-data"
            generate_demo_dataset(train_data, s["images"], s["image_size"], seed=0)
            proc, run_dir, spec = start_pretraining(work, make_spec(train_data, s, 0.0, cores, RECIPE))
            if proc.wait() != 0:
                sys.exit(f"trainer failed ({proc.returncode}); see {run_dir / 'train.log'}")
        encoder = load_encoder(run_dir, spec)
        for task in ("knn", "linear"):
            for seed in (0, 1, 2):
                torch.manual_seed(seed)
                random_init = build_encoder("resnet18", None, "random init")
                add(f"random init, seed {seed}", task, random_init, data, 0, "-")
            for seed in (0, 1, 2):
                add(f"PixPro, eval seed {seed}", task, encoder.backbone, data, seed, str(encoder.step))

    counts = np.bincount(data.test.labels, minlength=len(data.classes))
    print(
        f"\nresnet18; eval on {len(data.train) + len(data.test)} demo scenes at {s['image_size']} px "
        f"(seed 1), "
        f"labelled by dominant object class ({len(data.classes)} classes; {data.left_out} scenes without "
        f"objects left out), {len(data.train)} train / {len(data.test)} held-out (per class "
        f"{counts.tolist()}); majority class {100 * counts.max() / counts.sum():.1f}% top-1; "
        f"PixPro: {run_dir} step {encoder.step}; {cores} threads\n"
    )
    print("| weights | task | step | top-1 % | top-5 % | wall s |")
    print("|---|---|---|---|---|---|")
    for label, task, step, top1, top5, seconds in rows:
        print(f"| {label} | {task} | {step} | {top1:.1f} | {top5:.1f} | {seconds:.0f} |")
    for task in ("knn", "linear"):
        for kind in ("random init", "PixPro"):
            vals = [r[3] for r in rows if r[1] == task and r[0].startswith(kind)]
            print(f"{task} {kind}: mean {np.mean(vals):.1f} ± {np.std(vals):.1f} (min {min(vals):.1f})")


if __name__ == "__main__":
    main()
