"""LARS ``step()`` on the ResNet-50 PixPro model: the ``torch._foreach_*`` implementation
(``pixpro.lars.LARS``) against the per-parameter Python loop it replaced (``LoopLARS``, kept in
``tests/support/lars_reference.py`` as the reference of the tests and of this comparison).

The model is the recipe's (resnet50 backbone, projector 2048 -> 4096 -> 256, PPM), on the CPU in fp32,
with its two ``lars_param_groups`` (weight decay 1e-5) and random gradients for every trainable
parameter. Both optimizers step the same model and gradients, each with its own momentum buffers,
interleaved step by step. The table gives the median ms per step over ``--reps`` rounds, the speed-up
as the ratio of those medians and as the median of the per-round ratios (steadier when the load of a
shared machine drifts), and the aten ops one step dispatches (counted with a ``TorchDispatchMode``).
On a GPU each op of the loop is a kernel launch; that count is what the foreach version removes. On
the CPU the foreach ops run the same per-tensor kernels, so the time saved here is the dispatch
overhead and one temporary per adapted tensor (the trust ratio is applied in place).

    python benches/bench_lars.py [--reps 21] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixpro.builder import PixPro
from pixpro.lars import LARS, lars_param_groups
from tests.support.lars_reference import LoopLARS, OpCounter


def ops_per_step(optimizer: torch.optim.Optimizer) -> int:
    with OpCounter() as counter:
        optimizer.step()
    return counter.aten_ops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=21, help="interleaved rounds (one step of each per round)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = PixPro(backbone="resnet50")
    trainable = [q for q in model.parameters() if q.requires_grad]
    for q in trainable:
        q.grad = torch.randn_like(q) * 1e-3
    optimizers: dict[str, torch.optim.Optimizer] = {
        "loop (previous)": LoopLARS(lars_param_groups(model, 1e-5), lr=0.1),
        "foreach": LARS(lars_param_groups(model, 1e-5), lr=0.1),
    }
    groups = [len(g["params"]) for g in lars_param_groups(model, 1e-5)]
    ops = {}
    for name, opt in optimizers.items():
        opt.step()  # creates the momentum buffers
        opt.step()  # warm-up
        ops[name] = ops_per_step(opt)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(a.reps):
        for name, opt in optimizers.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    # Each round's loop time over its foreach time: load that drifts between rounds cancels out.
    paired = {
        name: statistics.median(b / t for b, t in zip(times["loop (previous)"], ts, strict=True))
        for name, ts in times.items()
    }
    print(
        f"\nLARS step, resnet50 PixPro (hidden 4096): {len(trainable)} tensors "
        f"({sum(q.numel() for q in trainable) / 1e6:.1f} M values) in groups of {groups[0]} "
        f"(adapted) and {groups[1]}; fp32, {a.threads} threads, median of {a.reps} interleaved rounds"
    )
    print("| LARS step | ms per step | speed-up (medians) | speed-up (per round) | aten ops per step |")
    print("|---|---|---|---|---|")
    base = ms["loop (previous)"]
    for name in optimizers:
        print(f"| {name} | {ms[name]:.1f} | {base / ms[name]:.2f}x | {paired[name]:.2f}x | {ops[name]} |")


if __name__ == "__main__":
    main()
