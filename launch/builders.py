"""Everything a run is built from its spec: the model, the data, the views on the device, the optimizer,
the seeds and the attempt's name. The trainer (:mod:`launch.train`) calls these in order; the preflight,
the GPU check and the tests build the same pieces through them.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launch import elastic
from launch.collectives import Collectives, DistEnv
from launch.sampler import ResumableSampler
from pixpro import photometric_cpu
from pixpro.augment import TwoViewTransform
from pixpro.builder import PixPro
from pixpro.data import ImageFolder, TwoViewDataset
from pixpro.demo_data import generate_demo_dataset
from pixpro.lars import LARS, lars_param_groups
from pixpro.sources import CachedSource
from schemas import RunSpec
from schemas.contract import ATTEMPT_ENV, RunPaths, round_suffix


# --- the run's environment ------------------------------------------------------------------------
def checkpoint_url(spec: RunSpec, run_dir: Path) -> str:
    return RunPaths(run_dir).store_url(spec.checkpoint.url)


def attempt_owner(collectives: Collectives) -> str:
    """This attempt, the same on every rank and across torchrun's restarts of its workers: the one that
    claims the run (``CheckpointStore.claim``).

    The launcher's ``PIXPRO_ATTEMPT`` (SLURM job id and restart count), else rank 0's clock and pid.
    """
    base = os.environ.get(ATTEMPT_ENV)
    if base is None and "SLURM_JOB_ID" in os.environ:
        base = f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    if base is None:
        local = f"local-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        base = collectives.broadcast_bytes(local.encode()).decode()
    return base


def attempt_id(owner: str) -> str:
    """A name unique to this launch: it names the attempt's checkpoint prefixes. The rendezvous round is
    appended to the attempt after a torchrun restart (the same on every node, unlike torchrun's per-agent
    restart count), so restarted workers never reuse a prefix."""
    return round_suffix(owner, elastic.rendezvous_round())


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed * 1000 + rank)


# --- builders (the method in a builder, a loader and a main, as in moco) ---------------------------
def build_model(spec: RunSpec) -> PixPro:
    """Identical initial weights on every rank and every attempt, drawn (on the CPU) from ``spec.seed``
    apart from the global streams: those stay each rank's own (:func:`seed_everything`), which a
    backbone's stochastic depth draws its masks from."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(spec.seed)
        return _pixpro(spec)


def _pixpro(spec: RunSpec) -> PixPro:
    m, loss = spec.model, spec.loss
    return PixPro(
        backbone=m.backbone,
        projector_hidden=m.projector_hidden,
        projector_out=m.projector_out,
        ppm_gamma=m.ppm_gamma,
        ppm_layers=m.ppm_layers,
        positive_threshold=loss.positive_threshold,
        loss=loss.kind,
        pixcontrast_tau=loss.pixcontrast_tau,
        instance_weight=loss.instance_weight,
        zero_init_residual=m.zero_init_residual,
    )


def data_storage_options(spec: RunSpec, url: str | None = None) -> dict[str, Any]:
    """fsspec options for ``data.root`` (or another data ``url``: the monitor's): on S3 the checkpoint
    store's rules (endpoint from ``PIXPRO_S3_ENDPOINT``, credentials from the environment, retries
    without jitter)."""
    if (url or spec.data.root).lower().startswith(("s3://", "s3a://")):
        from launch.store.s3 import s3_options

        return s3_options(dict(spec.data.storage_options), None)
    return dict(spec.data.storage_options)


def memory_cache_warning(
    cache_gb: float, workers: int, ranks_on_node: int, world_size: int, node_bytes: int
) -> str | None:
    """What ``data.cache: memory`` costs and gives on this node: every loader process keeps its own
    cache, and as each epoch deals the samples anew, a process's hit rate grows by about one in
    ``processes per rank x ranks`` per epoch. None where one process reads every sample."""
    processes = max(workers, 1)
    if processes * world_size == 1:
        return None
    total = cache_gb * processes * ranks_on_node
    over = f", more than its {node_bytes / 1e9:.0f} GB of memory" if total * 1e9 > node_bytes else ""
    return (
        f"data.cache memory: {ranks_on_node} rank(s) x {processes} loader process(es) here each keep their "
        f"own cache of up to {cache_gb:g} GB ({total:g} GB on this node{over}), and as each epoch deals "
        f"the samples anew, their hit rate grows by about 1 in {processes * world_size} per epoch: "
        "data.cache disk shares one cache per node"
    )


def _warn_memory_cache(spec: RunSpec, env: DistEnv) -> None:
    """The warning above, once per node (its first rank)."""
    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    node_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    note = memory_cache_warning(
        spec.data.cache_gb, spec.data.num_workers, ranks_on_node, env.world_size, node_bytes
    )
    if note and env.local_rank == 0:
        logging.getLogger(__name__).warning("%s", note)


def open_images(spec: RunSpec, root: str | Path) -> ImageFolder:
    """The run's images (a folder or a packed dataset, local or remote), cached as the spec says."""
    folder = ImageFolder(root, min_size=spec.data.crop_size, storage_options=data_storage_options(spec))
    if spec.data.cache != "none":
        where = spec.data.cache_dir or str(Path(tempfile.gettempdir(), "pixpro-cache", spec.name))
        max_bytes = int(spec.data.cache_gb * 1e9)
        folder.source = CachedSource(folder.source, spec.data.cache, max_bytes, where)
    return folder


def build_data(
    spec: RunSpec, env: DistEnv, collectives: Collectives | None = None
) -> tuple[TwoViewDataset, ResumableSampler]:
    root: str | Path = spec.data.root
    if spec.data.demo is not None:
        root = Path(spec.data.root)
        if env.rank == 0:
            d = spec.data.demo
            generate_demo_dataset(root, num_images=d.num_images, image_size=d.image_size, seed=d.seed)
        (collectives or Collectives()).barrier()
        root = root / "images"
    folder = open_images(spec, root)
    if spec.data.cache == "memory":
        _warn_memory_cache(spec, env)
    transform = TwoViewTransform(
        crop_size=spec.data.crop_size,
        scale=(spec.data.crop_scale[0], spec.data.crop_scale[1]),
        spatial=build_spatial(spec),
        photometric_later=spec.data.augment_on == "device",
        normalize_later=True,  # uint8 through shared memory and to the device, normalized there
    )
    if not transform.photometric_later:  # compiled here once: the forked loader workers inherit it
        photometric_cpu.precompile()
    dataset = TwoViewDataset(folder, transform, seed=spec.seed)
    sampler = ResumableSampler(
        len(dataset),
        seed=spec.seed,
        rank=env.rank,
        world_size=env.world_size,
        batch_size=spec.data.batch_size,
        drop_last=True,
    )
    return dataset, sampler


def device_views(transform: Any, batch: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A loader batch on the training device as the model takes it: ``(view1, view2, coords1, coords2)``,
    the views finished here (photometric steps with ``augment_on: device``, else the normalization)."""
    assert isinstance(transform, TwoViewTransform)
    keys = ("view1", "view2", "coords1", "coords2")
    v1, v2, c1, c2 = (batch[k].to(device, non_blocking=True) for k in keys)
    if "params1" in batch:  # data.augment_on: device; the parameter rows stay on the host
        v1 = transform.view1.photometric(v1, batch["params1"])
        v2 = transform.view2.photometric(v2, batch["params2"])
    elif v1.dtype == torch.uint8:  # finished in the workers as uint8 levels: normalized here
        v1, v2 = transform.view1.photometric.normalize(v1), transform.view2.photometric.normalize(v2)
    return v1, v2, c1, c2


def build_spatial(spec: RunSpec) -> list:
    """torchvision v2 spatial transforms from the spec; fill 0 so padding is marked invalid."""
    from torchvision.transforms import v2

    bilinear = v2.InterpolationMode.BILINEAR
    out = []
    for t in spec.data.spatial:
        if t.kind == "rotation":
            out.append(v2.RandomRotation(t.degrees, interpolation=bilinear))
        elif t.kind == "affine":
            out.append(
                v2.RandomAffine(
                    t.degrees, translate=t.translate, scale=t.scale, shear=t.shear, interpolation=bilinear
                )
            )
        elif t.kind == "perspective":
            out.append(v2.RandomPerspective(t.distortion_scale, p=t.p, interpolation=bilinear))
        elif t.kind == "elastic":
            out.append(v2.ElasticTransform(alpha=t.alpha, sigma=t.sigma, interpolation=bilinear))
    return out


def build_optimizer(spec: RunSpec, model: PixPro) -> torch.optim.Optimizer:
    o = spec.optim
    groups = lars_param_groups(model, o.weight_decay)
    if o.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=o.momentum, trust_coefficient=o.trust_coefficient)
    for g in groups:
        g.pop("lars_adapt", None)
    return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum)


# --- the trainer -----------------------------------------------------------------------------------
