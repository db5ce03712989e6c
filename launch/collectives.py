"""Every collective the trainer makes, in one place: which group, which tensors, which timeout.

Two planes. The **data plane** (DDP's gradient all-reduce, synchronized BatchNorm, the kNN monitor's
features) moves device tensors
on the device's group: NCCL between GPUs, gloo on a CPU. The **control plane** (the per-step
preempt/save agreement, the resume agreement, the attempt name, barriers) moves a few host integers and
bytes. NCCL has no CPU backend: a CPU tensor on an NCCL group fails with ``No backend type associated with
device type cpu``. So the control plane has a gloo group of its own, whatever the device, and nothing
outside this module calls ``torch.distributed`` directly.

Whether a collective runs follows whether a process group exists (torchrun started this process), never
``world_size == 1``: a one-GPU torchrun job runs the same code as an eight-GPU one.

The CPU tests hold the NCCL rule: a default group built as ``"cuda:gloo"`` refuses CPU tensors exactly as
NCCL does (``tests/test_collectives.py``). Here that group is detected and the data plane of a CPU run
gets a gloo group, so such a run trains only if every CPU tensor goes through this module's groups.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

log = logging.getLogger("pixpro.collectives")

CONTROL_BACKEND = "gloo"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from torchrun's environment (a lone process: rank 0 of 1)."""

    rank: int
    local_rank: int
    world_size: int
    launched: bool = False  # torchrun set up a rendezvous: a process group can (and will) be made

    @classmethod
    def from_environ(cls) -> DistEnv:
        return cls(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            launched="MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ,
        )


def bind_device(env: DistEnv) -> torch.device:
    """This rank's training device, bound before anything touches CUDA or a process group exists.

    Bound late, a rank's first CUDA tensor (a collective's buffer included) lands on cuda:0: eight ranks
    then share one GPU and NCCL hangs or fails.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", env.local_rank)
    torch.cuda.set_device(device)
    return device


def device_backend(device: torch.device) -> str:
    """The default group's backend: NCCL for CUDA tensors with gloo beside it for CPU ones on a GPU
    node; gloo alone on a CPU (``cpu:gloo,cuda:nccl`` fails to build where no GPU is visible)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


class Collectives:
    """The job's process groups and the control-plane operations; a no-op world of one without torchrun.

    ``data_group`` is what DDP and SyncBatchNorm take (None: the default group); every other collective
    is a method here, on the control group, with host tensors.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        control: ProcessGroup | None = None,
        data_group: ProcessGroup | None = None,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.control, self.data_group = control, data_group

    @property
    def active(self) -> bool:
        """A process group exists: every rank must take part in every collective below."""
        return self.control is not None

    @classmethod
    def start(cls, env: DistEnv, device: torch.device, timeout_s: float) -> Collectives:
        """Join the job's process groups (``env://`` on torchrun's store), or a world of one without it.

        ``timeout_s`` bounds every collective of both planes; see :func:`collective_timeout_s`.
        """
        if not env.launched:
            return cls()
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(
            device_backend(device),
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        control = _new_gloo_group(timeout)
        data: ProcessGroup | None = None  # the default group: NCCL on GPUs
        if device.type == "cpu" and "cpu:" not in dist.get_backend_config():
            # A default group that refuses CPU tensors (the tests' "cuda:gloo", NCCL's rule): a CPU run's
            # gradients and BN statistics then go through a gloo group of their own.
            data = _new_gloo_group(timeout)
        return cls(dist.get_rank(), dist.get_world_size(), control, data)

    # --- the control plane: host values, the control group -------------------------------------------
    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over all ranks: every rank takes the same decision at the same step."""
        if not self.active:
            return tuple(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return tuple(bool(v) for v in t.tolist())

    def all(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank."""
        if not self.active:
            return ok
        t = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return bool(t.item())

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Rank 0's ``data`` on every rank (others pass anything)."""
        if not self.active:
            return data
        box = [data]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    # --- the data plane beside DDP and SyncBatchNorm: device tensors, the data group ---------------------
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (the same shape and dtype on each), in rank order. It must live on the
        training device: the data group is NCCL on GPUs, which refuses CPU tensors."""
        if not self.active:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.data_group)
        return out

    def every_rank(self, flag: torch.Tensor) -> torch.Tensor:
        """A device bool that holds on every rank (MIN over the data group), queued on the device's
        stream without a host sync; ``flag`` itself without a process group."""
        if not self.active:
            return flag
        t = flag.to(torch.int32)  # NCCL reduces no bool
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.data_group)
        return t.bool()

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.control)

    def close(self) -> None:
        """Leave the job: a barrier first (a bare ``destroy_process_group()`` crashed at exit in 6 of 45
        launches here), then the groups."""
        if self.active:
            dist.barrier(group=self.control)
            dist.destroy_process_group()
            self.control = self.data_group = None


def _new_gloo_group(timeout: timedelta) -> ProcessGroup:
    group = dist.new_group(backend=CONTROL_BACKEND, timeout=timeout)
    assert isinstance(group, ProcessGroup)  # every rank is a member
    return group


WATCHDOG_MARGIN_S = 30.0
"""From a rank past its heartbeat's limit to the watchdog's kill: a 1 s poll, a 3 s wait for the stacks,
and room for an agent that reads its files slowly."""


def collective_timeout_s(
    final_flush_s: float, commit_s: float, hang_timeout_s: float, startup_s: float = 0.0
) -> float:
    """How long a collective may wait: the longest wait the code allows one rank while the others already
    sit in a collective, plus the hang watchdog's timeout (``resources.hang_timeout_s``).

    The longest wait is rank 0's final flush (the checkpointer's whole retry window, ``final_flush_s``,
    or ``commit_s`` of a preemption) before the closing barrier, or a start-up phase of another rank
    (``resources.startup_timeout_s``: listing the data, loading the checkpoint, the first step's compile,
    while the others wait in the first collective); the watchdog (:mod:`launch.watchdog`)
    gives that phase the same budget plus its timeout, so it restarts a hung group before any
    collective times out, and a collective still never waits forever. torch's defaults do not fit:
    NCCL's 10 min is shorter than the final flush (an S3 outage at the end would abort the other
    ranks), gloo's 30 min hides a hung rank for half an hour. :data:`WATCHDOG_MARGIN_S` on top: the
    watchdog acts once a rank is past its limit (its poll, its stack dump's wait, its kill), which the
    collective's own timeout must not win.
    """
    return max(final_flush_s, commit_s, startup_s) + hang_timeout_s + WATCHDOG_MARGIN_S
