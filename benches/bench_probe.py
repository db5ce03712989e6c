"""Does it learn? Pretrain resnet18 on the demo scenes with the real trainer, then dense-probe it.

Weights compared: the architecture at random init (three seeds), PixPro, and PixPro with the instance
branch (weight 1); for scale, a no-network control (patch colour statistics), the same resnet18 trained
*with the masks* for the same steps (how far any training moves the probe in this budget), and the
probe's ceiling at C5 resolution (true class fractions per 32-px cell). Each pretraining is
``python -m launch.train SPEC --run-dir DIR`` in a subprocess, exactly as a user runs it; the two run
side by side on half of the cores each, in bf16 autocast (``cpu_autocast``) when that measures
faster on this CPU.

Each encoder is read out on a *separate* demo dataset (other seed), frozen, from its last feature map:
- the class probe (:mod:`launch.tools.probe`): a 1x1 conv, held-out mIoU over the 6 classes;
- the foreground probe: the same on object-vs-background masks;
- linear read-outs (ridge R^2 on held-out cells) of each cell's mean colour and object fraction: what
  the features encode, and what pretraining made them drop (colour jitter) or gain;
- the effective rank (exp of the entropy of the PCA spectrum): dimensional collapse.

    python benches/bench_probe.py                 # the full run, about 16 minutes on 2 cores
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
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_step import cpu_autocast_speedup
from torch import nn

from launch.tools.probe import IGNORE, Split, extract_features, load_data, normalize, score_features
from launch.tools.weights import build_encoder, load_encoder
from pixpro.demo_data import generate_demo_dataset
from pixpro.model import build_backbone

REPO = Path(__file__).resolve().parents[1]

# 160 px crops give 5x5 C5 cells (96 px gave 3x3: too coarse for a pixel loss); batch 16 keeps the
# step cost of a 96 px batch of 32.
FULL = {"images": 512, "image_size": 160, "crop": 160, "batch": 16, "steps": 600, "probe_images": 256}
QUICK = {"images": 128, "image_size": 96, "crop": 64, "batch": 16, "steps": 16, "probe_images": 96}
# Short-budget recipe: see benches/RESULTS.md for why it departs from the 100-epoch ImageNet one.
RECIPE = {"lr": 1.0, "zero_init_residual": False, "ema": 0.99}


def make_spec(
    data: Path, s: dict, instance_weight: float, threads: int, recipe: dict, autocast: bool = False
) -> dict:
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
        "precision": "bf16" if autocast else "fp32",
        "cpu_autocast": autocast,
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


def _cells(t: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N*h*w, C]``: one row per feature-map cell."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def effective_rank(feats: torch.Tensor) -> float:
    """exp(entropy) of the PCA spectrum of last-layer features (cells as samples)."""
    cells = _cells(feats)
    energy = torch.linalg.svdvals(cells - cells.mean(0)).pow(2)
    p = energy / energy.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


FOREGROUND = ["background", "object"]


@dataclass
class ProbeData:
    """The probe scenes, read once: both splits and the class names."""

    train: Split
    test: Split
    classes: list[str]

    def class_score(self, train_feats: torch.Tensor, test_feats: torch.Tensor, epochs: int) -> dict:
        t, h = self.train, self.test
        return score_features(train_feats, t.masks, test_feats, h.masks, self.classes, epochs)

    def foreground_score(self, train_feats: torch.Tensor, test_feats: torch.Tensor, epochs: int) -> dict:
        t, h = self.train, self.test
        return score_features(
            train_feats, _objects(t.masks), test_feats, _objects(h.masks), FOREGROUND, epochs
        )

    def scores(self, train_feats: torch.Tensor, test_feats: torch.Tensor, epochs: int) -> tuple[dict, dict]:
        """(class probe, object-vs-background probe) on the given features of the two splits."""
        feats = train_feats, test_feats
        return self.class_score(*feats, epochs), self.foreground_score(*feats, epochs)


def _objects(masks: torch.Tensor) -> torch.Tensor:
    """Every object class merged into 1; ignored pixels stay ignored."""
    return torch.where(masks == IGNORE, masks, (masks > 0).long())


def supervised_reference(data: Path, steps: int, batch: int, threads: int, autocast: bool) -> nn.Module:
    """resnet18 trained *with the masks* of the pretraining scenes for the same steps and batch.

    Not a method under test: it shows how far any training can move the probe in this budget, so
    PixPro's gain over random init reads as a share of the learnable gap. Full images with random
    flips, SGD 0.05 (momentum 0.9, wd 1e-4), per-pixel cross-entropy on bilinearly upsampled logits,
    in the pretraining's precision.
    """
    torch.set_num_threads(threads)
    train, held_out, classes = load_data(data)
    images, masks = torch.cat([train.images, held_out.images]), torch.cat([train.masks, held_out.masks])
    torch.manual_seed(0)
    backbone, channels = build_backbone("resnet18", zero_init_residual=False)
    head = nn.Conv2d(channels, len(classes), 1)
    model = nn.Sequential(backbone, head).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,), generator=generator)
        x, y = normalize(images[idx]), masks[idx]
        flip = torch.rand(batch, generator=generator) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        logits = nn.functional.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear")
        loss = nn.functional.cross_entropy(logits, y, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return backbone.to(memory_format=torch.contiguous_format)


def oracle_features(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The probe's ceiling at C5 resolution: each 32-px cell's true class fractions as its features."""
    onehot = nn.functional.one_hot(masks.clamp(max=num_classes - 1), num_classes)
    return nn.functional.avg_pool2d(onehot.permute(0, 3, 1, 2).float(), 32)


def readout_r2(train_feats: torch.Tensor, test_feats: torch.Tensor, data: ProbeData) -> dict[str, float]:
    """Held-out R^2 of ridge read-outs from standardized C5 cells to each 32-px cell's mean colour
    (RGB) and object fraction; fitted on the probe's training split."""

    def targets(split: Split) -> dict[str, torch.Tensor]:
        colour = nn.functional.avg_pool2d(split.images.float() / 255, 32)
        objects = nn.functional.avg_pool2d((split.masks > 0).float()[:, None], 32)
        return {"colour": _cells(colour), "objectness": _cells(objects)}

    x_train, x_test = _cells(train_feats), _cells(test_feats)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    ones = torch.ones(1)
    x_train = torch.cat([(x_train - mean) / std, ones.expand(len(x_train), 1)], 1).double()
    x_test = torch.cat([(x_test - mean) / std, ones.expand(len(x_test), 1)], 1).double()
    gram = x_train.T @ x_train + 10.0 * torch.eye(x_train.shape[1], dtype=torch.float64)
    out = {}
    for (name, y_train), y_test in zip(targets(data.train).items(), targets(data.test).values(), strict=True):
        w = torch.linalg.solve(gram, x_train.T @ y_train.double())
        residual = ((x_test @ w - y_test) ** 2).sum(0)
        total = ((y_test - y_train.double().mean(0)) ** 2).sum(0)
        out[name] = float((1 - residual / total).mean())
    return out


def final_loss(run_dir: Path) -> float | None:
    from launch.records import read_metrics
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
    parser.add_argument("--fp32", action="store_true", help="never use bf16 autocast on CPU")
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
    torch.set_num_threads(threads)
    speedup = (
        None if args.fp32 else cpu_autocast_speedup("resnet18", settings["crop"], settings["batch"], 3, 1024)
    )
    autocast = speedup is not None and speedup["speedup"] > 1.2

    with tempfile.TemporaryDirectory(prefix="pixpro-bench-probe-") as tmp:
        work = args.work or Path(tmp)
        data, probe_data = work / "pretrain-data", work / "probe-data"
        generate_demo_dataset(data, settings["images"], settings["image_size"], seed=0)
        generate_demo_dataset(probe_data, settings["probe_images"], settings["image_size"], seed=1)
        probes = ProbeData(*load_data(probe_data))
        start = time.perf_counter()
        specs = [make_spec(data, settings, w, threads, recipe, autocast) for w in (0.0, 1.0)]
        runs = [start_pretraining(work, spec) for spec in specs]

        torch.set_num_threads(1)  # the baselines share the machine with the two trainers
        rows = []

        def features(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            return extract_features(module, probes.train.images), extract_features(module, probes.test.images)

        def add(label: str, module: nn.Module, steps: str = "-", seconds=None, loss=None) -> None:
            feats = features(module)
            rank, r2 = effective_rank(feats[1]), readout_r2(*feats, probes)
            rows.append((label, steps, seconds, loss, rank, r2, *probes.scores(*feats, probe_epochs)))

        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            add(f"random init (torchvision), seed {seed}", build_encoder("resnet18", None, "random init"))
        control = probes.scores(*features(PatchColour()), probe_epochs)
        rows.append(("patch colour statistics (no network)", "-", None, None, None, None, *control))

        labels = ("PixPro", "PixPro + instance (w=1)")
        for (proc, run_dir, spec_path), label in zip(runs, labels, strict=True):
            if proc.wait() != 0:
                sys.exit(f"trainer failed ({proc.returncode}); see {run_dir / 'train.log'}")
            encoder = load_encoder(run_dir, spec_path)
            seconds = time.perf_counter() - start
            add(label, encoder.backbone, f"{encoder.step}", seconds, final_loss(run_dir))

        torch.set_num_threads(cores)
        t = time.perf_counter()
        supervised = supervised_reference(data, settings["steps"], settings["batch"], cores, autocast)
        torch.set_num_threads(1)
        add(
            "reference: supervised with the masks",
            supervised,
            f"{settings['steps']}",
            time.perf_counter() - t,
        )
        k = len(probes.classes)
        oracle = oracle_features(probes.train.masks, k), oracle_features(probes.test.masks, k)
        merged = (oracle_features(_objects(split.masks), 2) for split in (probes.train, probes.test))
        ceiling = probes.class_score(*oracle, probe_epochs), probes.foreground_score(*merged, probe_epochs)
        rows.append(("ceiling: true class fractions per C5 cell", "-", None, None, None, None, *ceiling))

    s = settings
    precision = "bf16 autocast + channels_last" if autocast else "fp32"
    measured = f" ({speedup['speedup']:.1f}x faster than fp32 here)" if speedup is not None else ""
    print(
        f"\nresnet18, demo scenes: pretrain {s['images']} images at {s['image_size']}px, crop {s['crop']}, "
        f"batch {s['batch']}, {s['steps']} steps (LARS at LR {recipe['lr']:g}, cosine EMA from "
        f"{recipe['ema']}, zero-init residual {recipe['zero_init_residual']}), {precision}{measured}; "
        f"both runs side by side with {threads} thread(s) each; probes on {s['probe_images']} other scenes "
        f"(80/20 split), 1x1 conv on frozen C5 ({oracle[1].shape[-2]}x{oracle[1].shape[-1]}), "
        f"{probe_epochs} epochs, seed 0\n"
    )
    print(
        "| weights | steps | wall s | final loss | C5 eff. rank | R² colour | R² objectness "
        "| class mIoU % | foreground mIoU % |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, steps, seconds, loss, rank, r2, cls, fg in rows:
        cells = [
            label,
            steps,
            f"{seconds:.0f}" if seconds is not None else "-",
            f"{loss:.3f}" if loss is not None else "-",
            f"{rank:.1f}" if rank is not None else "-",
            f"{r2['colour']:.2f}" if r2 else "-",
            f"{r2['objectness']:.2f}" if r2 else "-",
            f"{100 * cls['miou']:.1f}",
            f"{100 * fg['miou']:.1f}",
        ]
        print("| " + " | ".join(cells) + " |")
    per_class = " | ".join(rows[0][6]["per_class_iou"])
    print(f"\nper-class IoU % ({per_class}):")
    for label, *_, cls, _fg in rows:
        print(f"- {label}: " + ", ".join(f"{100 * v:.0f}" for v in cls["per_class_iou"].values()))


if __name__ == "__main__":
    main()
