"""What the kNN monitor costs a run: its share of training time at the example spec's cadence.

Measured here, on this CPU with a small backbone (resnet18), in one process, interleaved: one PixPro
training step (EMA update, two views forward and backward, LARS) at batch ``--batch`` and crop ``--size``,
and one monitor evaluation (``KnnMonitor.evaluate``: eval mode, centre crops from its in-memory cache,
forward passes, the kNN votes) on demo scenes at the same crop; medians over ``--reps``. The first
evaluation, which decodes the crops once per process, is reported on its own.

Extrapolated to ``launch/specs/imagenet_r50_100ep.json``: per image, a monitor forward costs the measured
fraction of a training step's work; each rank embeds its share of the monitor's train + held-out images
once per ``every_epochs`` epochs, while training its batch every step of those epochs:

    share = E / (T + E),  E = (train_samples + test_samples) / ranks x eval cost per image
                          T = every_epochs x steps per epoch x batch per rank x step cost per image

    python benches/bench_monitor.py [--size 112] [--batch 16] [--reps 5] [--threads 1]

Prints a markdown table; the goal is a share of at most 2 % at the example's cadence.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_step import _time, pixpro_step

from launch.collectives import Collectives
from launch.monitor import KnnMonitor
from pixpro.demo_data import generate_demo_dataset
from schemas import MonitorSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "launch" / "specs" / "imagenet_r50_100ep.json"
IMAGENET_TRAIN = 1_281_167
GOAL = 0.02


def measure(size: int, batch: int, reps: int, scenes: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, _, step = pixpro_step("resnet18", size, batch, hidden=1024)
    with tempfile.TemporaryDirectory(prefix="pixpro-bench-monitor-") as tmp:
        generate_demo_dataset(Path(tmp), num_images=scenes, image_size=size + size // 4, seed=1)
        spec = MonitorSpec(data=tmp, every_steps=1, train_samples=scenes, test_samples=scenes)
        monitor = KnnMonitor(spec, size, Collectives(), torch.device("cpu"))
        images = len(monitor.train) + len(monitor.test)
        start = time.perf_counter()
        monitor.evaluate(model.backbone, 0)  # decodes and caches the crops
        first = time.perf_counter() - start
        step()  # warm-up
        steps, evals = [], []
        for _ in range(reps):  # interleaved: both see the same machine load
            steps += _time(step, 1)
            evals += _time(lambda: monitor.evaluate(model.backbone, 0), 1)
    step_s, eval_s = statistics.median(steps), statistics.median(evals)
    per_image = {"train_img_s": step_s / batch, "eval_img_s": eval_s / images}
    return {"images": images, "step_s": step_s, "eval_s": eval_s, "first_s": first, **per_image}


def cadences(found: dict[str, float]) -> list[tuple[str, int, float]]:
    """(cadence, steps between evaluations, share of training time) for the example spec; the last row is
    the most frequent cadence that stays within the goal."""
    spec = load_spec(EXAMPLE)
    assert spec.monitor is not None and spec.monitor.every_epochs is not None
    ranks, batch = spec.resources.ranks, spec.data.batch_size
    steps_per_epoch = IMAGENET_TRAIN // (batch * ranks)
    per_rank = (spec.monitor.train_samples + spec.monitor.test_samples) / ranks
    eval_cost = per_rank * found["eval_img_s"]
    out = []
    every = spec.monitor.every_epochs
    step_cost = batch * found["train_img_s"]
    limit = math.ceil(eval_cost * (1 - GOAL) / GOAL / step_cost)  # share = GOAL at this many steps
    for label, steps in (
        (f"every_epochs {every} (the example)", every * steps_per_epoch),
        ("every_steps 1000", 1000),
        ("every_steps 250", 250),
        (f"every_steps {limit} (the most frequent within {100 * GOAL:.0f} %)", limit),
    ):
        train_cost = steps * step_cost
        out.append((label, steps, eval_cost / (train_cost + eval_cost)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=112, help="crop of the step and the monitor")
    parser.add_argument("--batch", type=int, default=16, help="training batch of the measured step")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scenes", type=int, default=160, help="demo scenes the monitor reads")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: OpenMP barriers crawl on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    found = measure(args.size, args.batch, args.reps, args.scenes)
    print(
        f"threads {torch.get_num_threads()}, resnet18 at {args.size} px, {found['images']} monitor images\n"
    )
    print("| measured (median) | seconds | per image (ms) |")
    print("|---|---|---|")
    print(f"| training step, batch {args.batch} | {found['step_s']:.3f} | {1e3 * found['train_img_s']:.2f} |")
    print(f"| monitor evaluation, cached crops | {found['eval_s']:.3f} | {1e3 * found['eval_img_s']:.2f} |")
    print(f"| first evaluation (decodes the crops) | {found['first_s']:.3f} | - |")
    ratio = found["eval_img_s"] / found["train_img_s"]
    print(f"\nmonitor image / training image: {ratio:.3f}\n")
    spec = load_spec(EXAMPLE)
    assert spec.monitor is not None
    print(
        f"| {EXAMPLE.name}: {spec.monitor.train_samples} + {spec.monitor.test_samples} images over "
        f"{spec.resources.ranks} ranks | steps between evaluations | share of training time |"
    )
    print("|---|---|---|")
    rows = cadences(found)
    for label, steps, share in rows:
        print(f"| {label} | {steps} | {100 * share:.3f} % |")
    verdict = "within" if rows[0][2] <= GOAL else "OVER"
    print(f"\nthe example's cadence is {verdict} the goal of {100 * GOAL:.0f} %")


if __name__ == "__main__":
    main()
