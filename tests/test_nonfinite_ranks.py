"""fp16 on several ranks: one rank's non-finite loss is every rank's verdict.

fp16's guard decides on the loss (GradScaler skips inf gradients itself), and a loss is one rank's own.
Decided alone, the rank with the NaN would undo its EMA update and BN statistics while the others kept
theirs: the target encoders drift apart for the rest of the run with nothing said, and that rank alone
could reach ``optim.max_nonfinite_steps`` and leave the others in a collective. Two gloo ranks under
NCCL's device rule (a default group that refuses CPU tensors), DDP, GradScaler and the real guard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from launch.collectives import Collectives, DistEnv
from launch.nonfinite import NonFiniteGuard
from tests.support.procs import free_port

WORLD = 2


class Pair(nn.Module):
    """An online layer that trains and a target that follows it by EMA, as PixPro's two encoders."""

    def __init__(self) -> None:
        super().__init__()
        self.online = nn.Linear(4, 1)
        self.target = nn.Linear(4, 1).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.online(x).sum() + 0 * self.target(x).sum()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank))
    original = dist.init_process_group

    def nccl_rule(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        return original("cuda:gloo", *args, **kwargs)  # refuses CPU tensors, as NCCL does

    dist.init_process_group = nccl_rule  # type: ignore[assignment]
    collectives = Collectives.start(DistEnv.from_environ(), torch.device("cpu"), 60)
    try:
        torch.manual_seed(0)
        model = Pair()
        ddp = nn.parallel.DistributedDataParallel(model, process_group=collectives.data_group)
        optimizer = torch.optim.SGD(model.online.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=True)
        guard = NonFiniteGuard(model, optimizer, torch.device("cpu"))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        guard.begin()
        with torch.no_grad():  # the EMA update comes before the forward, as in the trainer's step
            for t, o in zip(model.target.parameters(), model.online.parameters(), strict=True):
                t.mul_(0.5).add_(o, alpha=0.5)
        loss = ddp(torch.full((2, 4), float("nan") if rank == 1 else 1.0))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        ok = guard.finish(loss, grads_checked=False, every_rank=collectives.every_rank)
        torch.save(
            {"ok": bool(ok), "before": before, "after": model.state_dict(), "counters": guard.counters()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        collectives.close()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fp16-guard")
    mp.start_processes(_worker, args=(free_port(), str(tmp)), nprocs=WORLD, start_method="spawn", join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_a_nan_loss_on_one_rank_undoes_the_step_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    assert [r["ok"] for r in ranks] == [False, False]
    for r in ranks:  # the EMA update undone too, on the rank whose own loss was finite as well
        assert all(torch.equal(r["before"][k], r["after"][k]) for k in r["before"]), r["after"]
    assert all(torch.equal(ranks[0]["after"][k], ranks[1]["after"][k]) for k in ranks[0]["after"])
    # one skipped step on each rank, and GradScaler's skip (the reduced gradients were not finite)
    assert [r["counters"].tolist() for r in ranks] == [[1, 1, 1], [1, 1, 1]]
