"""Run specs for the schema tests: the smallest valid one, one that sets every field, and helpers that
change one field or collect the error lines."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from schemas import SpecError, parse_spec

REPO = Path(__file__).resolve().parents[2]
MINIMAL: dict[str, Any] = {"data": {"root": "/data/images"}}
FULL: dict[str, Any] = {
    "name": "full-run_1.0",
    "seed": 3,
    "data": {
        "root": "/data/images",
        "demo": {"num_images": 512, "image_size": 64, "seed": 1},
        "crop_size": 64,
        "crop_scale": [0.2, 1.0],
        "spatial": [
            {"kind": "rotation", "degrees": 10},
            {"kind": "affine", "degrees": 5, "translate": [0.1, 0.1], "scale": [0.9, 1.1], "shear": 5},
            {"kind": "perspective", "distortion_scale": 0.3, "p": 0.5},
            {"kind": "elastic", "alpha": 20, "sigma": 4},
        ],
        "batch_size": 8,
        "num_workers": 0,
        "augment_on": "device",
        "storage_options": {},
        "cache": "disk",
        "cache_gb": 2.5,
        "cache_dir": "/local/cache",
    },
    "model": {
        "backbone": "resnet18",
        "projector_hidden": 64,
        "projector_out": 32,
        "ppm_gamma": 1.5,
        "ppm_layers": 2,
        "zero_init_residual": False,
    },
    "loss": {
        "kind": "pixcontrast",
        "positive_threshold": 0.5,
        "instance_weight": 1.0,
        "pixcontrast_tau": 0.2,
    },
    "optim": {
        "optimizer": "sgd",
        "base_lr": 0.5,
        "lr_scaling": "sqrt",
        "weight_decay": 1e-4,
        "momentum": 0.8,
        "trust_coefficient": 0.002,
        "epochs": 3,
        "warmup_epochs": 0.5,
        "final_lr": 0.0,
        "ema_base_momentum": 0.9,
        "max_steps": 10,
        "max_nonfinite_steps": 3,
    },
    "precision": "fp32",
    "channels_last": False,
    "cpu_autocast": False,
    "threads": 2,
    "deterministic": False,
    "checkpoint": {
        "url": "s3://bucket/prefix",
        "every_steps": 5,
        "every_minutes": 1.5,
        "keep_last": 2,
        "storage_options": {
            "endpoint_url": "http://127.0.0.1:5000",
            "client_kwargs": {"region_name": "us-east-1"},
            "anon": False,
            "max_retries": 3,
        },
    },
    "log_every_steps": 1,
    "logging": {
        "tensorboard": True,
        "wandb": {"project": "pixpro", "entity": None, "mode": "offline", "tags": ["r50"], "group": "g"},
    },
    "monitor": {
        "data": "s3://bucket/labelled",
        "every_steps": None,
        "every_epochs": 2,
        "train_samples": 500,
        "test_samples": 100,
        "k": 10,
        "temperature": 0.1,
    },
    "resources": {
        "nodes": 2,
        "gpus_per_node": 4,
        "cpus_per_task": 16,
        "mem_gb": 64,
        "time_limit_min": 30,
        "partition": "gpu",
        "account": "acct",
        "qos": "normal",
        "constraint": "a100",
        "signal": "USR1",
        "signal_lead_s": 90,
        "max_restarts": 1,
        "hang_timeout_s": 120,
        "startup_timeout_s": 900,
        "extra_sbatch": {"exclusive": "", "gres": "nvme:1"},
    },
}


def with_value(base: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with ``value`` set at ``a.b.c`` (missing dicts are created)."""
    out = copy.deepcopy(base)
    node = out
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def errors_of(obj: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(obj)
    return str(info.value).split("\n")


def assert_well_formed(err: SpecError) -> None:
    lines = str(err).split("\n")
    assert lines and lines == err.problems
    for line in lines:
        assert line.strip() == line and line, repr(line)
        assert "\r" not in line
        assert re.match(r"^\S.*?: \S", line), repr(line)
