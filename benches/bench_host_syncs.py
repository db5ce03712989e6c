"""Host syncs per training step, counted on the CPU: the ops that would make the host wait for a GPU.

A device->host sync per step (reading the loss) or per layer (torch's SyncBatchNorm filters ranks with a
boolean mask) stops the CPU from queueing work ahead of the GPU. ``tests/support/host_syncs.py`` counts
the aten ops that sync on a GPU while the trainer's own step runs on CPU tensors: the trainer as built by
``launch.train.Trainer`` (DDP, synchronized BN and LARS at world size 2 over gloo), bf16 autocast,
channels_last, the ImageNet recipe's ResNet-50 at a small crop. Per rank: a plain step, and what a
logging or checkpoint step adds (the loss is read: one sync). DDP twice: as the trainer builds it on CPU
(``find_unused_parameters``, which reads a flag per parameter) and as on GPUs.

    python benches/bench_host_syncs.py [--ranks 1 2] [--steps 3] [--backbone resnet50]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.host_syncs import HostSyncCounter  # noqa: E402
from tests.support.trainer import tiny_spec, write_spec  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(
    rank: int, world: int, port: int, spec_path: str, run_dir: str, steps: int, out: str, gpu_ddp: bool
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from launch.collectives import Collectives, DistEnv, bind_device
    from launch.preempt import PreemptionFlag
    from launch.train import Trainer
    from schemas import load_spec

    env = DistEnv.from_environ()
    device = bind_device(env)
    collectives = Collectives.start(env, device, timeout_s=300)
    trainer = Trainer(load_spec(Path(spec_path)), Path(run_dir), env, PreemptionFlag(()), collectives, device)
    # gpu_ddp: DDP as on GPUs (no find_unused_parameters, which reads a flag per parameter each backward)
    model = trainer.distributed_model(find_unused=False if gpu_ddp else None)
    batches = iter(trainer.loader())
    trainer._train_step(model, next(batches))  # warm-up: DDP's first backward builds its buckets
    trainer.step += 1
    plain = []
    for _ in range(steps):
        batch = next(batches)
        with HostSyncCounter() as counter:
            trainer._train_step(model, batch)
        trainer.step += 1
        plain.append(dict(counter.ops))
    with HostSyncCounter() as counter:
        trainer._read_step()
    read = dict(counter.ops)
    trainer.checkpointer.close()
    collectives.close()
    if rank == 0:
        bn = sum("BatchNorm" in type(m).__name__ for m in trainer.model.modules())
        Path(out).write_text(json.dumps({"plain": plain, "read": read, "bn_layers": bn}))


def measure(world: int, backbone: str, steps: int, gpu_ddp: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = tiny_spec(
            Path(tmp) / "data",
            model__backbone=backbone,
            model__projector_hidden=256,
            precision="bf16",
            cpu_autocast=True,
            channels_last=True,
            data__batch_size=2,
            log_every_steps=1000,
            threads=1,
        )
        spec_path = write_spec(Path(tmp) / "spec.json", spec)
        out = Path(tmp) / "out.json"
        args = (world, _free_port(), str(spec_path), str(Path(tmp) / "run"), steps, str(out), gpu_ddp)
        mp.spawn(_rank, args=args, nprocs=world, join=True)  # one rank: a process group of one, as torchrun
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backbone", default="resnet50")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for world in args.ranks:
        for gpu_ddp in (False, True):
            got = measure(world, args.backbone, args.steps, gpu_ddp)
            per_step = [sum(ops.values()) for ops in got["plain"]]
            ddp = "as on GPUs" if gpu_ddp else "as on CPUs (find_unused_parameters)"
            rows.append((world, ddp, got["bn_layers"], per_step, sum(got["read"].values()), got))
    print(
        f"| ranks | DDP | BN layers | host syncs per plain step ({args.steps} steps) | added at a log step |"
    )
    print("|---|---|---|---|---|")
    for world, ddp, bn, per_step, read, _ in rows:
        print(f"| {world} | {ddp} | {bn} | {', '.join(map(str, per_step))} | {read} (the loss read) |")
    for world, ddp, _, _, _, got in rows:
        print(f"ranks {world}, DDP {ddp}: ops per plain step {got['plain']}, in the read {got['read']}")


if __name__ == "__main__":
    main()
