"""Does it learn? Pretrain resnet18 on the demo scenes with the real trainer, then dense-probe it.

Rows: the architecture at random init (three seeds), a no-network control (patch colour statistics),
PixPro, and PixPro with the instance branch (weight 1). Each pretraining is
``python -m launch.train SPEC --run-dir DIR`` in a subprocess, exactly as a user runs it; the two run
side by side, each on half of the cores (on this 2-core machine that is 1.4x the throughput of running
them one after the other with 2 threads each). The probe (:mod:`launch.probe`) trains a 1x1 conv on
frozen last-layer features of a *separate* demo dataset (other seed) and reports held-out mIoU. The
effective rank of those features (exp of the entropy of their PCA spectrum) shows dimensional
collapse, the failure mode of BYOL-style objectives early in training.

    python benches/bench_probe.py                 # the full run, about 17 minutes on 2 cores
    python benches/bench_probe.py --steps 3000 --size 224   # the GPU-sized check: 7x7 cells
    python benches/bench_probe.py --quick         # a 2-minute smoke version (too short to learn)

Prints a markdown table and the settings; ``--work DIR`` keeps the runs (default: a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from launch.probe import extract_features, load_data, probe
from launch.weights import build_encoder, load_encoder
from pixpro.demo_data import generate_demo_dataset

REPO = Path(__file__).resolve().parents[1]

# 160 px crops give 5x5 C5 cells (96 px gave 3x3: too coarse for a pixel loss); batch 16 keeps the
# step cost of a 96 px batch of 32.
FULL = {"images": 512, "image_size": 160, "crop": 160, "batch": 16, "steps": 300, "probe_images": 256}
QUICK = {"images": 128, "image_size": 96, "crop": 64, "batch": 16, "steps": 16, "probe_images": 96}
# Short-budget recipe: see benches/RESULTS.md for why it departs from the 100-epoch ImageNet one.
RECIPE = {"lr": 1.0, "zero_init_residual": False, "ema": 0.99}


def make_spec(data: Path, s: dict, instance_weight: float, threads: int, recipe: dict) -> dict:
    """The demo run sized to ``s``: LARS at absolute LR ``recipe['lr']``, cosine EMA, no AMP."""
    steps_per_epoch = s["images"] // s["batch"]
    return {
        "name": f"bench-probe-inst{instance_weight:g}",
        "seed": 0,
        "data": {
            "root": str(data),
            "demo": {"num_images": s["images"], "image_size": s["image_size"], "seed": 0},
            "crop_size": s["crop"],
            "crop_scale": [0.2, 1.0],
            "batch_size": s["batch"],
            "num_workers": 1,
        },
        "model": {
            "backbone": "resnet18",
            "projector_hidden": 1024,
            "projector_out": 256,
            "zero_init_residual": recipe["zero_init_residual"],
        },
        "loss": {"instance_weight": instance_weight},
        "optim": {
            "base_lr": recipe["lr"] * 256 / s["batch"],
            "lr_scaling": "linear",
            "epochs": -(-s["steps"] // steps_per_epoch),
            "warmup_epochs": 1,
            "max_steps": s["steps"],
            "ema_base_momentum": recipe["ema"],
        },
        "precision": "fp32",
        "threads": threads,
        "checkpoint": {"every_minutes": 10.0, "keep_last": 1},
        "log_every_steps": 10,
        "resources": {"time_limit_min": 120},
    }


def start_pretraining(work: Path, spec: dict) -> tuple[subprocess.Popen, Path, Path]:
    """Start the trainer; returns (process, run dir, spec path)."""
    run_dir = work / spec["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXPRO_", "SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "launch.train", str(spec_path), "--run-dir", str(run_dir)]
    with open(run_dir / "train.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return proc, run_dir, spec_path


class PatchColour(nn.Module):
    """No network: per-32-px-patch colour mean, variance and second moments (15 channels).

    The control that shows the probe cannot be solved from colour statistics alone.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = nn.functional.avg_pool2d(x, 32)
        var = nn.functional.avg_pool2d(x * x, 32) - mean * mean
        r, g, b = mean[:, :1], mean[:, 1:2], mean[:, 2:]
        return torch.cat([mean, var, mean * mean, r * g, g * b, r * b], 1)


@torch.no_grad()
def effective_rank(backbone: nn.Module, images: torch.Tensor) -> float:
    """exp(entropy) of the PCA spectrum of the images' last-layer features (cells as samples)."""
    feats = extract_features(backbone, images)
    cells = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    energy = torch.linalg.svdvals(cells - cells.mean(0)).pow(2)
    p = energy / energy.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def final_loss(run_dir: Path) -> float | None:
    from launch.metrics import read_metrics
    from launch.store import CheckpointStore

    records = read_metrics(CheckpointStore(str(run_dir / "checkpoints")))
    return records[-1]["loss"] if records else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-minute smoke version")
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    parser.add_argument("--steps", type=int, default=None, help="override the pretraining steps")
    parser.add_argument("--size", type=int, default=None, help="scene and crop size in pixels")
    parser.add_argument("--lr", type=float, default=RECIPE["lr"], help="absolute LARS learning rate")
    parser.add_argument("--zero-init-residual", action="store_true", help="the ImageNet recipe's init")
    parser.add_argument("--probe-epochs", type=int, default=None)
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.size is not None:
        settings["image_size"] = settings["crop"] = args.size
    recipe = dict(RECIPE, lr=args.lr, zero_init_residual=args.zero_init_residual)
    probe_epochs = args.probe_epochs or (10 if args.quick else 30)
    cores = os.cpu_count() or 1
    threads = max(1, cores // 2)

    with tempfile.TemporaryDirectory(prefix="pixpro-bench-probe-") as tmp:
        work = args.work or Path(tmp)
        data, probe_data = work / "pretrain-data", work / "probe-data"
        generate_demo_dataset(data, settings["images"], settings["image_size"], seed=0)
        generate_demo_dataset(probe_data, settings["probe_images"], settings["image_size"], seed=1)
        start = time.perf_counter()
        runs = [start_pretraining(work, make_spec(data, settings, w, threads, recipe)) for w in (0.0, 1.0)]

        torch.set_num_threads(1)  # the baselines share the machine with the two trainers
        held_out = load_data(probe_data)[1].images  # read once for every effective rank
        rows = []
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            random = build_encoder("resnet18", None, "random init")
            result = probe(random, probe_data, 0, probe_epochs)
            rank = effective_rank(random, held_out)
            rows.append((f"random init (torchvision), seed {seed}", "-", None, None, rank, result))
        control = probe(PatchColour(), probe_data, 0, probe_epochs)
        rows.append(("patch colour statistics (no network)", "-", None, None, None, control))

        labels = ("PixPro", "PixPro + instance (w=1)")
        for (proc, run_dir, spec_path), label in zip(runs, labels, strict=True):
            if proc.wait() != 0:
                sys.exit(f"trainer failed ({proc.returncode}); see {run_dir / 'train.log'}")
            seconds = time.perf_counter() - start
            encoder = load_encoder(run_dir, spec_path)
            result = probe(encoder.backbone, probe_data, 0, probe_epochs)
            rank = effective_rank(encoder.backbone, held_out)
            rows.append((label, f"{encoder.step}", seconds, final_loss(run_dir), rank, result))

    s = settings
    print(
        f"\nresnet18, demo scenes: pretrain {s['images']} images at {s['image_size']}px, crop {s['crop']}, "
        f"batch {s['batch']}, {s['steps']} steps (LARS at LR {recipe['lr']:g}, cosine EMA from "
        f"{recipe['ema']}, zero-init residual {recipe['zero_init_residual']}), both runs side by side with "
        f"{threads} thread(s) each; probe on {s['probe_images']} other scenes (80/20 split), 1x1 conv on "
        f"frozen C5 ({rows[0][5]['feature_size'][0]}x{rows[0][5]['feature_size'][1]}), "
        f"{probe_epochs} epochs, seed 0\n"
    )
    print("| weights | steps | wall s | final loss | C5 effective rank | mIoU % | pixel acc % |")
    print("|---|---|---|---|---|---|---|")
    for label, steps, seconds, loss, rank, r in rows:
        secs = f"{seconds:.0f}" if seconds is not None else "-"
        loss_text = f"{loss:.3f}" if loss is not None else "-"
        rank_text = f"{rank:.1f}" if rank is not None else "-"
        print(
            f"| {label} | {steps} | {secs} | {loss_text} | {rank_text} | {100 * r['miou']:.1f} | "
            f"{100 * r['pixel_accuracy']:.1f} |"
        )
    per_class = " | ".join(rows[0][5]["per_class_iou"])
    print(f"\nper-class IoU % ({per_class}):")
    for label, *_, r in rows:
        print(f"- {label}: " + ", ".join(f"{100 * v:.0f}" for v in r["per_class_iou"].values()))


if __name__ == "__main__":
    main()
