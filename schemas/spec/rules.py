"""Rules between fields that the JSON Schema cannot express, checked after the models validate, and the
values a spec implies beyond its fields (the hang timeout's default)."""

from __future__ import annotations

from schemas.backbones import backbone
from schemas.spec.run import RunSpec

CROSS_FIELD_RULES: dict[str, str] = {
    "optim.warmup_epochs": "less than optim.epochs",
    "resources.signal_lead_s": "less than resources.time_limit_min * 60",
    "cpu_autocast": "not with precision fp16",
    "data.crop_size": "at least the backbone's min_crop (last feature map at least 2x2)",
    "data.demo.image_size": "at least data.crop_size",
    "data.demo.num_images": "at least one global batch (data.batch_size x resources ranks)",
    "data.demo": "only with a local data.root",
    "data.cache_dir": "a local path",
    "data.root": "no user info, a bucket for object stores",
    "data.crop_scale": "0 < lo <= hi <= 1",
    "data.spatial": "scale 0 < lo <= hi; translate fractions in [0, 1]",
    "checkpoint.url": "no user info, a bucket for object stores",
    "monitor.data": "no user info, a bucket for object stores",
    "monitor.every_epochs": "exactly one of monitor.every_steps and monitor.every_epochs",
    "name": "not '.' or '..'",
}
"""Rules the exported JSON Schema cannot express (relations between fields, tables, URL parts), by the
field path an error names; besides these, credentials are refused anywhere (:mod:`schemas.secrets`).
Everything else the validator and the schema decide alike (tested by generating specs from the schema)."""


def too_few_images(spec: RunSpec, images: int, ranks: int) -> str:
    """The one line the validator, the preflight and the trainer all give a data set smaller than one
    global batch: the sampler drops the last partial batch, so such a run has no step to train."""
    field = "data.demo.num_images" if spec.data.demo is not None else "data.root"
    batch = spec.data.batch_size
    return (
        f"{field}: {images} images are fewer than one global batch of {batch * ranks} "
        f"(data.batch_size {batch} x {ranks} rank{'s' if ranks > 1 else ''})"
    )


def model_problems(spec: RunSpec) -> list[str]:
    """Checks that need the backbone table: what would otherwise crash the trainer after queueing."""
    problems: list[str] = []
    info = backbone(spec.model.backbone)
    crop = spec.data.crop_size
    if info is not None and crop < info.min_crop:
        problems.append(
            f"data.crop_size: {crop} px is too small for {spec.model.backbone} (output stride "
            f"{info.stride}): its last feature map would be smaller than 2x2; use at least {info.min_crop}"
        )
    demo = spec.data.demo
    if demo is not None and demo.image_size < crop:
        problems.append(
            f"data.demo.image_size: {demo.image_size} px demo images are smaller than data.crop_size "
            f"({crop}); the loader would skip every image"
        )
    if demo is not None and demo.num_images < spec.data.batch_size * spec.resources.ranks:
        problems.append(too_few_images(spec, demo.num_images, spec.resources.ranks))
    if demo is not None and "://" in spec.data.root and not spec.data.root.lower().startswith("file://"):
        problems.append("data.demo: the demo dataset is generated into a local data.root, not a URL")
    if spec.data.cache_dir is not None and "://" in spec.data.cache_dir:
        problems.append("data.cache_dir: the disk cache lives on node-local storage: a local path")
    return problems


DEFAULT_HANG_TIMEOUT_S = 300
"""Between two steps after the first: a data loader refilling at an epoch start, a checkpoint's
hand-over to the uploader, a metrics flush. Object-store data doubles it (slow reads on a cold cache)."""


def hang_timeout_s(spec: RunSpec) -> int:
    """``resources.hang_timeout_s``, or its default for what this run reads."""
    if spec.resources.hang_timeout_s is not None:
        return spec.resources.hang_timeout_s
    remote = "://" in spec.data.root and not spec.data.root.lower().startswith("file://")
    return 2 * DEFAULT_HANG_TIMEOUT_S if remote else DEFAULT_HANG_TIMEOUT_S
