"""Does it learn? Pretrain resnet18 on the demo scenes with the real trainer, then dense-probe it.

Three rows: the architecture at random init, PixPro, and PixPro with the instance branch (weight 1).
Each pretraining is ``python -m launch.train SPEC --run-dir DIR`` in a subprocess, exactly as a user
runs it; the probe (:mod:`launch.probe`) trains a 1x1 conv on frozen last-layer features of a
*separate* demo dataset (other seed) and reports held-out mIoU. PixPro must beat random init: that
is the end-to-end signal that the loss, the geometry and the EMA target are right.

    python benches/bench_probe.py            # the full run, about 15 minutes on a laptop CPU
    python benches/bench_probe.py --quick    # a 2-minute smoke version (too short to learn much)

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

from launch.probe import probe
from launch.weights import build_encoder, load_encoder
from pixpro.demo_data import generate_demo_dataset
from pixpro.model import build_backbone

REPO = Path(__file__).resolve().parents[1]

FULL = {"images": 512, "image_size": 128, "crop": 96, "batch": 32, "steps": 200, "probe_images": 256}
QUICK = {"images": 128, "image_size": 96, "crop": 64, "batch": 16, "steps": 16, "probe_images": 96}


def make_spec(data: Path, s: dict, instance_weight: float, threads: int) -> dict:
    """The demo recipe (LARS, sqrt LR scaling, cosine EMA) sized to ``s``."""
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
        "model": {"backbone": "resnet18", "projector_hidden": 1024, "projector_out": 256},
        "loss": {"instance_weight": instance_weight},
        "optim": {
            "base_lr": 1.0,
            "lr_scaling": "sqrt",
            "epochs": -(-s["steps"] // steps_per_epoch),
            "warmup_epochs": 1,
            "max_steps": s["steps"],
        },
        "precision": "fp32",
        "threads": threads,
        "checkpoint": {"every_minutes": 10.0, "keep_last": 1},
        "log_every_steps": 10,
        "resources": {"time_limit_min": 60},
    }


def pretrain(work: Path, spec: dict) -> tuple[Path, Path, float]:
    """Run the trainer to completion; returns (run dir, spec path, seconds)."""
    run_dir = work / spec["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXPRO_", "SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = str(REPO)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "launch.train", str(spec_path), "--run-dir", str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"trainer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return run_dir, spec_path, time.perf_counter() - start


@torch.no_grad()
def mean_share(run_dir: Path, spec_path: Path, probe_data: Path) -> float:
    """Share of the online projector's output energy in its mean direction, over held-out cells.

    Near 1 means every cell of every image projects to about the same vector: the loss is being lowered
    by aligning everything (the collapsed phase of BYOL-style training), not by telling cells apart.
    """
    from launch.checkpoint import TRAIN_FILE, from_bytes
    from launch.probe import load_data
    from launch.store import CheckpointStore
    from launch.train import build_model
    from pixpro.augment import IMAGENET_MEAN, IMAGENET_STD
    from schemas import load_spec

    spec = load_spec(spec_path)
    store = CheckpointStore(str(run_dir / "checkpoints"))
    model = build_model(spec)
    model.load_state_dict(from_bytes(store.read(store.resolve(), TRAIN_FILE))["state"]["model"])
    _, test, _ = load_data(probe_data)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    z = model.eval().projector(model.backbone((test.images.float() - mean) / std))
    cells = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return float(cells.mean(0).pow(2).sum() / cells.pow(2).sum(1).mean())


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
    parser.add_argument("--probe-epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    probe_epochs = args.probe_epochs or (10 if args.quick else 30)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="pixpro-bench-probe-") as tmp:
        work = args.work or Path(tmp)
        data = work / "pretrain-data"
        probe_data = work / "probe-data"
        generate_demo_dataset(probe_data, settings["probe_images"], settings["image_size"], seed=1)
        rows = []
        torch.manual_seed(0)
        random = build_encoder("resnet18", None, "random init")
        rows.append(
            ("random init (torchvision)", "-", None, None, None, probe(random, probe_data, 0, probe_epochs))
        )
        torch.manual_seed(0)  # what pretraining starts from: the spec's seed, zero-init residual BN
        start, _ = build_backbone("resnet18", zero_init_residual=True)
        rows.append(
            ("PixPro init (step 0)", "0", None, None, None, probe(start, probe_data, 0, probe_epochs))
        )
        for weight in (0.0, 1.0):
            spec = make_spec(data, settings, weight, args.threads)
            run_dir, spec_path, seconds = pretrain(work, spec)
            encoder = load_encoder(run_dir, spec_path)
            label = "PixPro" if weight == 0 else "PixPro + instance (w=1)"
            result = probe(encoder.backbone, probe_data, 0, probe_epochs)
            share = mean_share(run_dir, spec_path, probe_data)
            rows.append((label, f"{encoder.step}", seconds, final_loss(run_dir), share, result))

    s = settings
    print(
        f"\nresnet18, demo scenes: pretrain {s['images']} images at {s['image_size']}px, crop {s['crop']}, "
        f"batch {s['batch']}, {s['steps']} steps (LARS, base LR 1.0 sqrt-scaled, cosine EMA from 0.99); "
        f"probe on {s['probe_images']} other scenes (80/20 split), 1x1 conv on frozen C5 "
        f"({rows[0][5]['feature_size'][0]}x{rows[0][5]['feature_size'][1]}), {probe_epochs} epochs, seed 0\n"
    )
    print("| weights | steps | pretrain s | final loss | proj. mean share | mIoU % | pixel acc % |")
    print("|---|---|---|---|---|---|---|")
    for label, steps, seconds, loss, share, r in rows:
        secs = f"{seconds:.0f}" if seconds is not None else "-"
        loss_text = f"{loss:.3f}" if loss is not None else "-"
        share_text = f"{share:.2f}" if share is not None else "-"
        print(
            f"| {label} | {steps} | {secs} | {loss_text} | {share_text} | {100 * r['miou']:.1f} | "
            f"{100 * r['pixel_accuracy']:.1f} |"
        )
    per_class = " | ".join(rows[0][5]["per_class_iou"])
    print(f"\nper-class IoU % ({per_class}):")
    for label, *_, r in rows:
        print(f"- {label}: " + ", ".join(f"{100 * v:.0f}" for v in r["per_class_iou"].values()))


if __name__ == "__main__":
    main()
