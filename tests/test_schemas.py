"""Run spec validation: paper defaults, one-line field-path errors, credentials, hashing, schema export."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import schemas
from schemas import (
    OWNED_SBATCH_OPTIONS,
    SCHEMA_PATH,
    RunSpec,
    SpecError,
    hang_timeout_s,
    hash_payload,
    json_schema,
    json_schema_text,
    load_spec,
    parse_spec,
    spec_hash,
)

REPO = Path(__file__).resolve().parents[1]
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


# ------------------------------------------------------------------------------------------ defaults


def test_defaults_are_the_official_100_epoch_recipe() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.name == "pixpro" and spec.seed == 0
    assert spec.data.crop_size == 224 and spec.data.crop_scale == (0.08, 1.0)
    assert spec.data.spatial == [] and spec.data.demo is None
    assert spec.data.batch_size == 128 and spec.data.num_workers == 8
    m = spec.model
    assert (m.backbone, m.projector_hidden, m.projector_out) == ("resnet50", 4096, 256)
    assert (m.ppm_gamma, m.ppm_layers, m.zero_init_residual) == (2.0, 1, True)
    loss = spec.loss
    assert (loss.kind, loss.positive_threshold, loss.instance_weight, loss.pixcontrast_tau) == (
        "pixpro",
        0.7,
        0.0,
        0.3,
    )
    o = spec.optim
    assert (o.optimizer, o.base_lr, o.lr_scaling) == ("lars", 1.0, "linear")
    assert (o.weight_decay, o.momentum, o.trust_coefficient) == (1e-5, 0.9, 0.001)
    assert (o.epochs, o.warmup_epochs, o.final_lr, o.ema_base_momentum, o.max_steps) == (
        100,
        5.0,
        1e-6,
        0.99,
        None,
    )
    assert isinstance(o.warmup_epochs, float)
    assert (spec.precision, spec.channels_last, spec.threads) == ("bf16", True, None)
    c = spec.checkpoint
    assert (c.url, c.every_steps, c.every_minutes, c.keep_last, c.storage_options) == (
        None,
        None,
        10.0,
        3,
        {},
    )
    assert spec.log_every_steps == 10
    r = spec.resources
    assert (r.nodes, r.gpus_per_node, r.cpus_per_task, r.mem_gb, r.time_limit_min) == (1, 0, None, None, 1440)
    assert (r.partition, r.account, r.qos, r.constraint) == (None, None, None, None)
    assert (r.signal, r.signal_lead_s, r.max_restarts, r.extra_sbatch) == ("USR2", 120, 0, {})
    assert r.hang_timeout_s is None and hang_timeout_s(spec) == 300


def test_spatial_transform_defaults_follow_torchvision() -> None:
    spec = parse_spec(
        with_value(
            MINIMAL,
            "data.spatial",
            [{"kind": "perspective"}, {"kind": "elastic"}, {"kind": "affine", "degrees": 0}],
        )
    )
    persp, elastic, affine = spec.data.spatial
    assert isinstance(persp, schemas.PerspectiveSpec) and (persp.distortion_scale, persp.p) == (0.5, 0.5)
    assert isinstance(elastic, schemas.ElasticSpec) and (elastic.alpha, elastic.sigma) == (50.0, 5.0)
    assert isinstance(affine, schemas.AffineSpec)
    assert (affine.translate, affine.scale, affine.shear) == ((0.0, 0.0), (1.0, 1.0), 0.0)


def test_full_spec_round_trips() -> None:
    spec = parse_spec(FULL)
    assert spec.model_dump(mode="json") == FULL
    again = parse_spec(spec.model_dump(mode="json"))
    assert again == spec and spec_hash(again) == spec_hash(spec)
    assert spec.resources.extra_sbatch == {"exclusive": "", "gres": "nvme:1"}
    assert [t.kind for t in spec.data.spatial] == ["rotation", "affine", "perspective", "elastic"]


def test_data_is_required() -> None:
    assert errors_of({}) == ["data: Field required"]
    assert errors_of({"data": {}}) == ["data.root: Field required"]


# ------------------------------------------------------------------------------------- constraints

BAD_VALUES = [
    ("name", "", "name"),
    ("name", "a b", "name"),
    ("name", "x" * 65, "name"),
    ("name", "..", "name"),
    ("name", 5, "name"),
    ("seed", -1, "seed"),
    ("seed", 1.5, "seed"),
    ("data.root", "", "data.root"),
    ("data.demo", {"num_images": 0}, "data.demo.num_images"),
    ("data.demo", {"image_size": 8}, "data.demo.image_size"),
    ("data.demo", {"seed": -1}, "data.demo.seed"),
    ("data.crop_size", 16, "data.crop_size"),
    ("data.crop_scale", [0.0, 1.0], "data.crop_scale"),
    ("data.crop_scale", [0.5, 0.2], "data.crop_scale"),
    ("data.crop_scale", [0.5, 1.5], "data.crop_scale"),
    ("data.crop_scale", [0.5], "data.crop_scale[1]"),
    ("data.crop_scale", "wide", "data.crop_scale"),
    ("data.spatial", [{"kind": "rotation", "degrees": -1}], "data.spatial[0].degrees"),
    ("data.spatial", [{"kind": "rotation", "degrees": 181}], "data.spatial[0].degrees"),
    ("data.spatial", [{"kind": "rotation"}], "data.spatial[0].degrees"),
    ("data.spatial", [{"kind": "affine", "degrees": 1, "translate": [2, 0]}], "data.spatial[0].translate"),
    ("data.spatial", [{"kind": "affine", "degrees": 1, "scale": [0, 1]}], "data.spatial[0].scale"),
    ("data.spatial", [{"kind": "affine", "degrees": 1, "scale": [2, 1]}], "data.spatial[0].scale"),
    ("data.spatial", [{"kind": "affine", "degrees": 1, "shear": 90}], "data.spatial[0].shear"),
    ("data.spatial", [{"kind": "perspective", "p": 2}], "data.spatial[0].p"),
    ("data.spatial", [{"kind": "perspective", "distortion_scale": -0.1}], "data.spatial[0].distortion_scale"),
    ("data.spatial", [{"kind": "elastic", "sigma": 0}], "data.spatial[0].sigma"),
    ("data.spatial", [{"kind": "elastic", "alpha": -1}], "data.spatial[0].alpha"),
    ("data.spatial", [{"kind": "elastic"}, {"degrees": 3}], "data.spatial[1]"),
    ("data.spatial", [{"kind": "zoom"}], "data.spatial[0]"),
    ("data.spatial", [7], "data.spatial[0]"),
    ("data.batch_size", 0, "data.batch_size"),
    ("data.num_workers", -1, "data.num_workers"),
    ("model.backbone", "", "model.backbone"),
    ("model.backbone", "res-net", "model.backbone"),
    ("model.backbone", "1abc", "model.backbone"),
    ("model.projector_hidden", 0, "model.projector_hidden"),
    ("model.projector_out", 0, "model.projector_out"),
    ("model.ppm_gamma", 0, "model.ppm_gamma"),
    ("model.ppm_layers", 3, "model.ppm_layers"),
    ("model.zero_init_residual", "maybe", "model.zero_init_residual"),
    ("loss.kind", "byol", "loss.kind"),
    ("loss.positive_threshold", 0, "loss.positive_threshold"),
    ("loss.instance_weight", -0.1, "loss.instance_weight"),
    ("loss.pixcontrast_tau", 0, "loss.pixcontrast_tau"),
    ("optim.optimizer", "adam", "optim.optimizer"),
    ("optim.base_lr", 0, "optim.base_lr"),
    ("optim.base_lr", float("inf"), "optim.base_lr"),
    ("optim.base_lr", float("nan"), "optim.base_lr"),
    ("optim.lr_scaling", "log", "optim.lr_scaling"),
    ("optim.weight_decay", -1e-5, "optim.weight_decay"),
    ("optim.momentum", 1.0, "optim.momentum"),
    ("optim.trust_coefficient", 0, "optim.trust_coefficient"),
    ("optim.epochs", 0, "optim.epochs"),
    ("optim.epochs", 2.5, "optim.epochs"),
    ("optim.warmup_epochs", -1, "optim.warmup_epochs"),
    ("optim.warmup_epochs", 100, "optim.warmup_epochs"),
    ("optim.final_lr", -1, "optim.final_lr"),
    ("optim.ema_base_momentum", 1.0, "optim.ema_base_momentum"),
    ("optim.ema_base_momentum", -0.1, "optim.ema_base_momentum"),
    ("optim.max_steps", 0, "optim.max_steps"),
    ("precision", "fp8", "precision"),
    ("channels_last", "sometimes", "channels_last"),
    ("cpu_autocast", "maybe", "cpu_autocast"),
    ("threads", 0, "threads"),
    ("deterministic", "yes", "deterministic"),
    ("checkpoint.url", "", "checkpoint.url"),
    ("checkpoint.url", "http://example.com/x", "checkpoint.url"),
    ("checkpoint.url", "s3://", "checkpoint.url"),
    ("checkpoint.url", "s3://bucket/a\nb", "checkpoint.url"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps"),
    ("checkpoint.every_minutes", 0, "checkpoint.every_minutes"),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last"),
    ("checkpoint.storage_options", {"retries": [1]}, "checkpoint.storage_options.retries"),
    ("checkpoint.storage_options", [1], "checkpoint.storage_options"),
    ("log_every_steps", 0, "log_every_steps"),
    ("resources.nodes", 0, "resources.nodes"),
    ("resources.gpus_per_node", -1, "resources.gpus_per_node"),
    ("resources.cpus_per_task", 0, "resources.cpus_per_task"),
    ("resources.mem_gb", 0, "resources.mem_gb"),
    ("resources.time_limit_min", 0, "resources.time_limit_min"),
    ("resources.partition", "a b", "resources.partition"),
    ("resources.account", "", "resources.account"),
    ("resources.qos", "x\ny", "resources.qos"),
    ("resources.constraint", "", "resources.constraint"),
    ("resources.signal", "KILL", "resources.signal"),
    ("resources.signal_lead_s", 5, "resources.signal_lead_s"),
    ("resources.signal_lead_s", 86400, "resources.signal_lead_s"),
    ("resources.max_restarts", -1, "resources.max_restarts"),
    ("resources.hang_timeout_s", 29, "resources.hang_timeout_s"),
    ("resources.hang_timeout_s", 0, "resources.hang_timeout_s"),
    ("resources.hang_timeout_s", "soon", "resources.hang_timeout_s"),
    ("resources.extra_sbatch", {"--mem-per-cpu": "4G"}, "resources.extra_sbatch['--mem-per-cpu']"),
    ("resources.extra_sbatch", {"Gres": "x"}, "resources.extra_sbatch.Gres"),
    ("resources.extra_sbatch", {"comment": "a\nb"}, "resources.extra_sbatch.comment"),
    ("resources.extra_sbatch", {"comment": ["x"]}, "resources.extra_sbatch.comment"),
]


@pytest.mark.parametrize(
    ("dotted", "value", "path"), BAD_VALUES, ids=[f"{d}={v!r}"[:60] for d, v, _ in BAD_VALUES]
)
def test_each_constraint_is_rejected_with_its_field_path(dotted: str, value: Any, path: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(with_value(MINIMAL, dotted, value))
    assert_well_formed(info.value)
    assert any(line.startswith(f"{path}: ") for line in info.value.problems), info.value.problems


def test_cpu_autocast_refuses_fp16() -> None:
    lines = errors_of(with_value(with_value(MINIMAL, "precision", "fp16"), "cpu_autocast", True))
    assert lines == [
        "cpu_autocast: needs precision 'bf16' or 'fp32' (CPU autocast has no fast fp16) (got True)"
    ]
    assert parse_spec(with_value(MINIMAL, "cpu_autocast", True)).cpu_autocast  # bf16, the default


def test_every_problem_is_reported_at_once() -> None:
    bad = with_value(with_value(with_value(MINIMAL, "seed", -1), "optim.epochs", 0), "resources.nodes", 0)
    lines = errors_of(bad)
    assert [line.split(":")[0] for line in lines] == ["seed", "optim.epochs", "resources.nodes"]
    assert lines[0] == "seed: Input should be greater than or equal to 0 (got -1)"


def test_cross_field_limits_name_the_later_field() -> None:
    (line,) = errors_of(with_value(with_value(MINIMAL, "optim.epochs", 3), "optim.warmup_epochs", 3))
    assert line == "optim.warmup_epochs: must be less than epochs (3) (got 3)"
    (line,) = errors_of(
        with_value(with_value(MINIMAL, "resources.time_limit_min", 2), "resources.signal_lead_s", 120)
    )
    assert line == "resources.signal_lead_s: must be less than time_limit_min * 60 (120 s) (got 120)"
    assert parse_spec(with_value(MINIMAL, "resources", {"time_limit_min": 3, "signal_lead_s": 179}))


def test_long_values_are_truncated_in_messages() -> None:
    (line,) = errors_of(with_value(MINIMAL, "name", "é" * 500))
    assert line.startswith("name: String should match pattern") and "..." in line
    assert len(line) < 200


def test_plain_paths_and_supported_schemes_are_accepted() -> None:
    for url in [
        "/scratch/ckpt",
        "relative/dir",
        "file:///tmp/x",
        "s3://b/p",
        "gs://b",
        "az://c/p",
        "memory://x",
    ]:
        assert parse_spec(with_value(MINIMAL, "checkpoint.url", url)).checkpoint.url == url


# ------------------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("dotted", "expected"),
    [
        ("optim.lr", "optim.lr: unknown key (allowed: optimizer, base_lr,"),
        ("optim.epoch", "optim.epoch: unknown key; did you mean 'epochs'? (got 1)"),
        ("model.projector_hiden", "model.projector_hiden: unknown key; did you mean 'projector_hidden'?"),
        ("data.demo.size", "data.demo.size: unknown key"),
        ("resources.gpus", "resources.gpus: unknown key; did you mean"),
        ("checkpoint.bucket", "checkpoint.bucket: unknown key"),
        ("learning_rate", "learning_rate: unknown key"),
    ],
)
def test_unknown_keys_are_rejected_naming_the_path(dotted: str, expected: str) -> None:
    base = with_value(MINIMAL, "data.demo", {}) if dotted.startswith("data.demo") else MINIMAL
    lines = errors_of(with_value(base, dotted, 1))
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_unknown_key_inside_a_spatial_transform() -> None:
    lines = errors_of(
        with_value(MINIMAL, "data.spatial", [{"kind": "elastic"}, {"kind": "rotation", "degrees": 1, "p": 1}])
    )
    assert lines == ["data.spatial[1].p: unknown key (allowed: kind, degrees) (got 1)"]


def test_odd_keys_are_quoted_to_keep_one_line() -> None:
    lines = errors_of({"data": {"root": "x"}, "bad\nkey": 1, "": 2, 3: 4})
    assert len(lines) == 3
    assert lines[0].startswith("['bad\\nkey']: unknown key")
    assert lines[1].startswith("['']: unknown key")
    assert lines[2].startswith("[3]: ")


# -------------------------------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    "options",
    [
        {"key": "AKIAEXAMPLE"},
        {"SECRET": "hunter2-secret"},
        {"Token": "tok-secret"},
        {"password": "hunter2-secret"},
        {"aws_access_key_id": "AKIAEXAMPLE"},
        {"AWS_SECRET_ACCESS_KEY": "hunter2-secret"},
        {"aws_session_token": "tok-secret"},
        {"client_kwargs": {"aws_secret_access_key": "hunter2-secret", "region_name": "x"}},
        {"config_kwargs": {"deep": {"Password": "hunter2-secret"}}},
        {"client_kwargs": {"list": [{"token": "tok-secret"}]}},
        {"account_key": "hunter2-secret", "bad_type": [1]},
    ],
)
def test_credentials_in_storage_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(with_value(MINIMAL, "checkpoint.storage_options", options))
    text = str(info.value)
    assert_well_formed(info.value)
    assert text.startswith("checkpoint.storage_options.")
    assert "is not allowed: credentials come from the environment" in text
    assert "environment" in text and "never the spec" in text
    for secret in ("AKIAEXAMPLE", "hunter2-secret", "tok-secret"):
        assert secret not in text


def test_secrets_are_never_echoed_from_misplaced_keys() -> None:
    spec = with_value(MINIMAL, "checkpoint.aws_secret_access_key", "hunter2-secret")
    spec = with_value(spec, "storage_options", {"token": "tok-secret"})
    spec = with_value(spec, "checkpoint.url", "s3://AKIA:hunter2-secret@bucket/p")
    text = "\n".join(errors_of(spec))
    assert "hunter2-secret" not in text and "tok-secret" not in text and "AKIA" not in text
    assert "checkpoint.url: a value that looks like a URL with user:password is not allowed" in text
    assert "checkpoint.aws_secret_access_key: a credential key is not allowed" in text
    assert "storage_options.token: a credential key is not allowed" in text


def test_harmless_storage_options_are_accepted() -> None:
    spec = parse_spec(FULL)
    assert spec.checkpoint.storage_options["client_kwargs"] == {"region_name": "us-east-1"}
    assert spec.checkpoint.storage_options["anon"] is False
    assert spec.checkpoint.storage_options["max_retries"] == 3


# ------------------------------------------------------------------------------------ extra_sbatch


@pytest.mark.parametrize("option", sorted(OWNED_SBATCH_OPTIONS))
def test_sbatch_options_owned_by_pixpro_are_refused(option: str) -> None:
    lines = errors_of(with_value(MINIMAL, "resources.extra_sbatch", {"exclusive": "", option: "1"}))
    assert len(lines) == 1
    assert lines[0].startswith("resources.extra_sbatch: options set by pixpro are not allowed: ")
    assert repr(option) in lines[0]


def test_required_owned_sbatch_options_are_in_the_list() -> None:
    required = {"nodes", "ntasks-per-node", "gpus-per-node", "signal", "requeue", "time", "output", "error"}
    assert required | {"job-name"} <= set(OWNED_SBATCH_OPTIONS)


def test_sbatch_numbers_become_text() -> None:
    spec = parse_spec(with_value(MINIMAL, "resources.extra_sbatch", {"nice": 10, "exclusive": ""}))
    assert spec.resources.extra_sbatch == {"nice": "10", "exclusive": ""}


# ------------------------------------------------------------------------------------------- files


def test_yaml_spec_loads(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "# a comment\n"
        "name: yaml-run\n"
        "data:\n"
        "  root: /data/x\n"
        "  spatial:\n"
        "    - {kind: rotation, degrees: 15}\n"
        "optim:\n"
        "  weight_decay: 1e-5   # PyYAML reads this as a string; the float field converts it\n"
        "  warmup_epochs: 2\n"
        "channels_last: no\n"
        "resources:\n"
        "  extra_sbatch: {nice: 10}\n"
    )
    spec = load_spec(path)
    assert spec.name == "yaml-run" and spec.optim.weight_decay == 1e-5 and spec.channels_last is False
    assert spec.optim.warmup_epochs == 2.0 and spec.data.spatial[0].degrees == 15.0
    assert spec.resources.extra_sbatch == {"nice": "10"}
    (tmp_path / "run.yml").write_text(path.read_text())
    assert load_spec(str(tmp_path / "run.yml")) == spec


def test_json_spec_loads(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(FULL, indent=2))
    assert load_spec(path) == parse_spec(FULL)


def test_json_decode_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "data": {"root": "x",}\n}\n')
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}:2:24: invalid JSON: Expecting property name enclosed in double quotes"


def test_yaml_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  root: x\n  crop_size: [1, 2\nseed: 1\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert_well_formed(info.value)
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+:\d+: invalid YAML: .+", str(info.value))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("dup.json", '{"seed": 1, "seed": 2, "data": {"root": "x"}}', "invalid JSON: duplicate key 'seed'"),
        ("dup.yaml", "seed: 1\ndata: {root: x}\nseed: 2\n", ":3:1: invalid YAML: duplicate key 'seed'"),
        ("list.json", "[1, 2]", "top level must be an object (mapping), got list"),
        ("empty.yaml", "", "top level must be an object (mapping), got null"),
        ("scalar.yml", "just text", "top level must be an object (mapping), got str"),
        ("date.yaml", "data: {root: x}\nname: 2024-13-45\n", "invalid YAML: month must be in 1..12"),
    ],
)
def test_file_level_problems(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("data:\n  <<: {root: x, crop_size: 64}\n  crop_size: 96\n")
    assert load_spec(path).data.crop_size == 96


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.json")
    assert str(info.value) == f"{tmp_path / 'nope.json'}: no such file"
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert str(info.value) == f"{tmp_path}: not a file"


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.json"
    path.write_bytes(b'{"name": "\xe9"}')
    with pytest.raises(SpecError, match=r"not UTF-8 text"):
        load_spec(path)


def test_validation_errors_from_files_use_field_paths(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: {root: x}\noptim: {lr: 4.0}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith("optim.lr: unknown key")


def test_spec_error_is_a_value_error_and_pickles() -> None:
    err = SpecError(["a: one", "b: two", "a: one"])
    assert isinstance(err, ValueError) and str(err) == "a: one\nb: two"
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems and str(again) == str(err)


# ------------------------------------------------------------------------------------------ schema


def test_exported_schema_file_is_current() -> None:
    current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.is_file() else ""
    assert current == json_schema_text(), (
        f"{SCHEMA_PATH} is out of date; regenerate it with `python -m schemas --write` "
        "(or `python -m schemas > schemas/run_spec.schema.json`)"
    )
    assert json.loads(current) == json_schema()


def test_schema_is_valid_and_agrees_with_the_models() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for good in (MINIMAL, FULL, parse_spec(FULL).model_dump(mode="json")):
        validator.validate(good)
    for dotted, value in [
        ("optim.lr", 1.0),
        ("name", "a b"),
        ("resources.extra_sbatch", {"time": "10"}),
        ("checkpoint.url", "http://x"),
        ("data.spatial", [{"kind": "zoom"}]),
        ("model.ppm_layers", 3),
    ]:
        bad = with_value(MINIMAL, dotted, value)
        assert not validator.is_valid(bad), dotted
        with pytest.raises(SpecError):
            parse_spec(bad)


def test_every_field_is_documented() -> None:
    schema = json_schema()
    for model in [schema, *schema["$defs"].values()]:
        assert model.get("additionalProperties") is False
        for name, prop in model["properties"].items():
            assert prop.get("description"), name


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_schema_cli_prints_checks_and_writes() -> None:
    out = _run("-m", "schemas")
    assert out.returncode == 0 and out.stdout == json_schema_text()
    check = _run("-m", "schemas", "--check")
    assert check.returncode == 0, check.stderr


def test_importing_schemas_loads_neither_torch_nor_the_rest_of_the_project(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: {root: x}\n")
    code = (
        "import sys, schemas, schemas.__main__\n"
        f"schemas.load_spec({str(path)!r}); schemas.json_schema()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'torchvision', 'numpy', 'pixpro', 'cluster', 'launch'})\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    out = _run("-c", code)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr


# -------------------------------------------------------------------------------------------- hash


def _reorder(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _reorder(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [_reorder(v) for v in obj]
    return obj


def test_spec_hash_is_stable_across_key_order_and_spelling() -> None:
    spec = parse_spec(FULL)
    assert spec_hash(parse_spec(_reorder(FULL))) == spec_hash(spec)
    assert re.fullmatch(r"[0-9a-f]{64}", spec_hash(spec))
    a = parse_spec(with_value(MINIMAL, "optim.warmup_epochs", 5))
    b = parse_spec(with_value(MINIMAL, "optim.warmup_epochs", 5.0))
    assert spec_hash(a) == spec_hash(b) == spec_hash(parse_spec(MINIMAL))
    explicit = parse_spec(MINIMAL).model_dump(mode="json")
    assert spec_hash(parse_spec(explicit)) == spec_hash(parse_spec(MINIMAL))


def test_spec_hash_of_the_defaults_is_pinned() -> None:
    # Changing this breaks resume of every existing checkpoint: only do it on purpose.
    assert (
        spec_hash(parse_spec(MINIMAL)) == "c645cfa85c3b78b13e33c2f93653bee6dc72eb4f7e3748a7463b2fe76f327e75"
    )


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("resources", {"nodes": 8, "gpus_per_node": 8, "partition": "big", "time_limit_min": 10}),
        ("checkpoint", {"url": "s3://other/p", "every_steps": 1, "every_minutes": None, "keep_last": 9}),
        ("checkpoint.storage_options", {"endpoint_url": "http://elsewhere"}),
        ("log_every_steps", 1),
        ("data.num_workers", 0),
        ("threads", 1),
        ("deterministic", True),
    ],
)
def test_spec_hash_ignores_what_does_not_change_training(dotted: str, value: Any) -> None:
    assert spec_hash(parse_spec(with_value(FULL, dotted, value))) == spec_hash(parse_spec(FULL))


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("model.ppm_gamma", 1.0),
        ("model.backbone", "resnet50"),
        ("model.ppm_layers", 0),
        ("optim.base_lr", 2.0),
        ("optim.max_steps", 11),
        ("loss.kind", "pixpro"),
        ("data.crop_size", 48),
        ("data.spatial", []),
        ("seed", 4),
        ("precision", "bf16"),
        ("cpu_autocast", True),
    ],
)
def test_spec_hash_changes_with_the_training_recipe(dotted: str, value: Any) -> None:
    assert spec_hash(parse_spec(with_value(FULL, dotted, value))) != spec_hash(parse_spec(FULL))


def test_hash_payload_leaves_out_the_operational_fields() -> None:
    payload = hash_payload(parse_spec(FULL))
    assert {"resources", "checkpoint", "log_every_steps", "threads"}.isdisjoint(payload)
    assert "num_workers" not in payload["data"] and payload["model"]["backbone"] == "resnet18"


# -------------------------------------------------------------------------------------------- fuzz

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
ODD_VALUES = st.sampled_from(
    [
        *(None, True, False, 0, -1, 1, 2**70, -(2**70), 0.5, -1e-9, 1e308, math.inf, -math.inf, math.nan),
        *(
            "",
            "x",
            "\n",
            "s3://",
            "http://x",
            "USR2",
            "a" * 80,
            [],
            [1],
            [0.5, 0.2],
            {},
            {"kind": "rotation"},
        ),
    ]
)
FIELD_NAMES = st.sampled_from(
    ["kind", "degrees", "root", "lr", "key", "secret", "Token", "time", "nodes", "seed", "demo", "spatial"]
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a nested spec (dict keys and list indices)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for seg in path:
        obj = obj[seg]
    return obj


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    spec = copy.deepcopy(draw(st.sampled_from([FULL, MINIMAL, {**MINIMAL, "optim": {"epochs": 10}}])))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(spec)))
        op = draw(st.sampled_from(["replace", "odd", "delete", "unknown", "number", "wrap"]))
        target = _get(spec, path)
        if not path:
            if op == "replace":
                spec = draw(JSON_VALUES)
            continue
        parent = _get(spec, path[:-1])
        last = path[-1]
        if op == "replace":
            parent[last] = draw(JSON_VALUES)
        elif op == "odd":
            parent[last] = copy.deepcopy(draw(ODD_VALUES))
        elif op == "delete":
            del parent[last]
        elif op == "unknown" and isinstance(target, dict):
            target[draw(FIELD_NAMES | st.text(max_size=8))] = draw(JSON_VALUES)
        elif op == "number" and isinstance(target, (int, float)) and not isinstance(target, bool):
            parent[last] = draw(st.sampled_from([-target, target * 1e6, target + 0.5, 0, -1, target - 1]))
        elif op == "wrap":
            parent[last] = draw(st.sampled_from([[target], {"value": target}, str(target)]))
        if not isinstance(spec, dict):
            break
    return spec


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON_VALUES, mutated_specs(), mutated_specs(), mutated_specs()))
def test_fuzz_parse_spec_only_returns_a_spec_or_a_spec_error(obj: Any) -> None:
    try:
        spec = parse_spec(obj)
    except SpecError as err:
        assert_well_formed(err)
        event("SpecError")
        return
    event("RunSpec")
    assert isinstance(spec, RunSpec)
    assert parse_spec(spec.model_dump(mode="json")) == spec
    assert len(spec_hash(spec)) == 64


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda s, i, junk: s[:i] + junk + s[i:],
            st.just(json.dumps(FULL, indent=1)),
            st.integers(0, len(json.dumps(FULL, indent=1))),
            st.text(min_size=1, max_size=3),
        ),
    ),
    suffix=st.sampled_from([".json", ".yaml", ".yml", ""]),
)
def test_fuzz_load_spec_text(fuzz_dir: Path, text: str, suffix: str) -> None:
    path = fuzz_dir / f"spec{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        assert isinstance(load_spec(path), RunSpec)
    except SpecError as err:
        lines = str(err).split("\n")
        assert all(line and line == line.strip() for line in lines), lines


# ------------------------------------------------------------------------------ issue 12: strict types


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("data.batch_size", "16"),
        ("data.batch_size", True),
        ("data.batch_size", 16.5),
        ("model.ppm_layers", True),
        ("model.ppm_layers", "1"),
        ("optim.epochs", True),
        ("optim.base_lr", "1.0"),
        ("optim.base_lr", False),
        ("channels_last", 1),
        ("channels_last", "true"),
        ("data.crop_scale", ["0.2", 1.0]),
        ("resources.extra_sbatch", {"nice": True}),
        ("name", 7),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_quoted_numbers_and_booleans_are_refused_in_json_and_yaml(
    tmp_path: Path, dotted: str, value: Any, suffix: str
) -> None:
    """No silent coercion: the error names the field that is wrong, in JSON and YAML alike."""
    import yaml

    spec = with_value(MINIMAL, dotted, value)
    path = tmp_path / f"s{suffix}"
    path.write_text(json.dumps(spec) if suffix == ".json" else yaml.safe_dump(spec))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems[0].startswith(f"{dotted}"), info.value.problems
    assert not jsonschema.Draft202012Validator(json_schema()).is_valid(spec)


def test_epochs_true_is_blamed_on_epochs_not_warmup() -> None:
    assert errors_of(with_value(MINIMAL, "optim.epochs", True)) == [
        "optim.epochs: Input should be a valid integer (got True)"
    ]


def test_integral_floats_are_integers_as_in_the_schema() -> None:
    """JSON Schema calls 16.0 an integer; so does the validator (and stores 16)."""
    spec = parse_spec(with_value(with_value(MINIMAL, "data.batch_size", 16.0), "threads", 2.0))
    assert spec.data.batch_size == 16 and type(spec.data.batch_size) is int and spec.threads == 2
    assert jsonschema.Draft202012Validator(json_schema()).is_valid(
        with_value(MINIMAL, "data.batch_size", 16.0)
    )


def test_yaml_exponent_floats_are_numbers(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("data: {root: x}\noptim: {weight_decay: 1e-5, final_lr: -0E+0, base_lr: 2e0}\n")
    spec = load_spec(path)
    assert (spec.optim.weight_decay, spec.optim.final_lr, spec.optim.base_lr) == (1e-5, 0.0, 2.0)


def test_example_specs_validate_against_the_exported_schema() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    for path in sorted((REPO / "launch/specs").glob("*.json")):
        data = json.loads(path.read_text())
        assert data["$schema"] == "../../schemas/run_spec.schema.json" and data["$comment"], path
        assert (path.parent / data["$schema"]).resolve() == SCHEMA_PATH.resolve()
        validator.validate(data)
        load_spec(path)
    assert errors_of({**MINIMAL, "$comment": 5}) == ["$comment: must be a string (got int)"]


# -------------------------------------------------------------------------------- issue 12: secrets


@pytest.mark.parametrize(
    "key",
    [
        "credential",  # adlfs
        "api_key",
        "API-KEY",
        "apiKey",
        "x-api-key",
        "Authorization",
        "token",
        "refresh_token",
        "client_secret",
        "Password",
        " password ",
        "\u200bpassword",
        "pass\u200bword",
        "AWS.Secret.Access.Key",
        "sas_token",
        "connection_string",
        "private_key",
        "key",
    ],
)
def test_secret_keys_are_refused_after_normalisation(key: str) -> None:
    from schemas.secrets import is_secret_key

    assert is_secret_key(key)
    for where in (
        "checkpoint.storage_options",
        "checkpoint.storage_options.client_kwargs.headers",
        "resources.extra_sbatch",
    ):
        lines = errors_of(with_value(MINIMAL, where, {key: "hunter2-secret"}))
        assert len(lines) == 1 and "a credential key is not allowed" in lines[0], lines
        assert "hunter2-secret" not in lines[0]


@pytest.mark.parametrize(
    "key", ["endpoint_url", "region_name", "profile", "anon", "account_name", "SSEKMSKeyId", "use_ssl"]
)
def test_harmless_keys_are_not_secrets(key: str) -> None:
    from schemas.secrets import is_secret_key

    assert not is_secret_key(key)
    parse_spec(with_value(MINIMAL, "checkpoint.storage_options", {key: "us-east-1"}))


@pytest.mark.parametrize(
    ("dotted", "value", "what"),
    [
        ("checkpoint.storage_options.client_kwargs.endpoint_url", "http://u:hunter2@h:9000", "user:password"),
        ("checkpoint.url", "s3://minio:hunter2@bucket/p", "user:password"),
        ("checkpoint.storage_options.profile", "AKIAABCDEFGHIJKLMNOP", "AWS access key id"),
        ("resources.extra_sbatch.comment", "Bearer abcdefghijklmnopqrs", "authorization value"),
        ("resources.extra_sbatch.comment", "AccountKey=abcdEFGH==;", "connection string"),
        ("data.root", "https://acct.blob.core.windows.net/c?sv=1&sig=hunter2", "signed-URL signature"),
        ("checkpoint.storage_options.headers", ["ghp_abcdefghijklmnopqrstuvwxyz012345"], "GitHub token"),
    ],
)
def test_secret_values_are_refused_by_shape_anywhere(dotted: str, value: Any, what: str) -> None:
    lines = errors_of(with_value(MINIMAL, dotted, value))
    assert len(lines) == 1 and what in lines[0] and "is not allowed" in lines[0], lines
    assert lines[0].startswith(dotted.split(".")[0])
    for part in ("hunter2", "AKIAABCD", "abcdefghijklmnopqrs", "abcdEFGH", "ghp_"):
        assert part not in lines[0]


def test_redact_hides_what_the_validator_refuses() -> None:
    from schemas.secrets import MASK, redact, secret_value_problem

    data = {
        "endpoint_url": "http://u:pw12345@host/x",
        "Api-Key": "k-123456",
        "nested": [{"token": "t-123456"}, "AKIAABCDEFGHIJKLMNOP"],
        "region_name": "us-east-1",
    }
    out = redact(data)
    assert out == {
        "endpoint_url": f"http://{MASK}@host/x",
        "Api-Key": MASK,
        "nested": [{"token": MASK}, MASK],
        "region_name": "us-east-1",
    }
    assert data["Api-Key"] == "k-123456"  # a copy
    text = redact("connect password=hunter2 to http://u:pw@h with Authorization: Bearer abcdefghijkl")
    assert "hunter2" not in text and "pw@" not in text and "abcdefghijkl" not in text, text
    assert redact(7) == 7 and secret_value_problem("plain words") is None
    prose = "NoCredentialsError: Unable to locate credentials"
    assert redact(prose) == prose  # an exception's name is not a key=value pair


# ------------------------------------------------------------------------ issue 12: model-aware checks


@pytest.mark.parametrize(
    ("backbone", "too_small", "smallest"),
    [
        ("resnet18", 32, 33),
        ("resnet50", 32, 33),
        ("convnext_tiny", 63, 64),
        ("vgg16", 63, 64),
        ("alexnet", 94, 95),
    ],
)
def test_crop_too_small_for_the_backbone(backbone: str, too_small: int, smallest: int) -> None:
    """The last feature map must be at least 2x2: with 1x1, BatchNorm refuses a per-rank batch of 1."""
    base = with_value(MINIMAL, "model.backbone", backbone)
    (line,) = errors_of(with_value(base, "data.crop_size", too_small))
    assert line.startswith(f"data.crop_size: {too_small} px is too small for {backbone}")
    assert line.endswith(f"use at least {smallest}")
    parse_spec(with_value(base, "data.crop_size", smallest))


def test_demo_images_smaller_than_the_crop() -> None:
    spec = with_value(with_value(MINIMAL, "data.demo", {"image_size": 64}), "data.crop_size", 96)
    assert errors_of(spec) == [
        "data.demo.image_size: 64 px demo images are smaller than data.crop_size (96); the loader would "
        "skip every image"
    ]


@pytest.mark.parametrize(
    ("name", "hint"),
    [("vit_b_16", "not a torchvision convolutional backbone"), ("resnet5", "did you mean 'resnet50'?"),
     ("googlenet", "not a torchvision"), ("os.system", "not a torchvision")],
)  # fmt: skip
def test_backbones_come_from_the_registry(name: str, hint: str) -> None:
    (line,) = errors_of(with_value(MINIMAL, "model.backbone", name))
    assert line.startswith("model.backbone: ") and hint in line, line


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("data.batch_size", 1),
        ("seed", 2**32),
        ("data.demo", {"seed": 2**32}),
        ("threads", 1025),
        ("loss.pixcontrast_tau", 1e-4),
        ("optim.max_steps", 10**12),
        ("resources.gpus_per_node", 65),
        ("name", "-rf"),
        ("name", ".hidden"),
        ("data.root", "x" * 5000),
    ],
)
def test_ranges_the_trainer_needs(dotted: str, value: Any) -> None:
    (line,) = errors_of(with_value(MINIMAL, dotted, value))
    assert line.startswith(dotted if not dotted.startswith("data.demo") else "data.demo.seed"), line
    assert not jsonschema.Draft202012Validator(json_schema()).is_valid(with_value(MINIMAL, dotted, value))


def test_backbone_table_is_in_sync_with_torchvision() -> None:
    """schemas/backbones.json lists every torchvision classification model, and the trainer's own
    builder still gives the recorded smallest crop (regenerate: python -m launch.tools.backbones --write)."""
    import torchvision

    from launch.tools.backbones import _measure
    from schemas import backbones

    table = json.loads(backbones.TABLE_PATH.read_text())
    assert table["torchvision"] == torchvision.__version__.split("+")[0]
    listed = set(table["backbones"]) | set(table["unsupported"])
    assert listed == set(torchvision.models.list_models(module=torchvision.models))
    assert {"resnet50", "convnext_tiny", "regnet_y_400mf"} <= set(backbones.backbone_names())
    assert {"vit_b_16", "googlenet"} <= set(backbones.unsupported_backbones())
    for name in ("resnet18", "convnext_tiny", "alexnet"):
        entry, _ = _measure(name)
        assert entry == table["backbones"][name], name


# ---------------------------------------------------------------------------- issue 12: bounded input


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["data: {root: x}", 'a0: &a0 ["xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1000
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}: too large") and "KiB" in line, line


def test_huge_keys_and_values_are_shortened() -> None:
    key = "k" * 1_000_000
    for spec in ({**MINIMAL, key[:100_000]: 1}, with_value(MINIMAL, "name", "é" * 100_000)):
        lines = errors_of(spec)
        assert len(lines) == 1 and len(lines[0]) <= 200, len(lines[0])
    assert errors_of({**MINIMAL, key: 1})[0].startswith("spec: too large")


def test_file_problems_are_one_line(tmp_path: Path) -> None:
    long_name = tmp_path / ("x" * 300 + ".json")
    with pytest.raises(SpecError) as info:
        load_spec(long_name)
    (line,) = info.value.problems
    assert "File name too long" in line and len(line) <= 200, line
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**MINIMAL, "$comment": "x" * 300_000}))
    with pytest.raises(SpecError, match="larger than 256 KiB"):
        load_spec(big)


def test_set_overrides_are_validated_like_the_file() -> None:
    from schemas import apply_overrides

    data = apply_overrides(MINIMAL, ["data.batch_size=16", "name=run-b", "data.crop_scale=[0.2, 1]"])
    spec = parse_spec(apply_overrides(data, ['data.spatial=[{"kind": "rotation", "degrees": 5}]']))
    assert (spec.data.batch_size, spec.name, spec.data.crop_scale) == (16, "run-b", (0.2, 1.0))
    spec = parse_spec(apply_overrides(spec.model_dump(mode="json"), ["data.spatial.0.degrees=7"]))
    assert spec.data.spatial[0].degrees == 7.0 and MINIMAL == {"data": {"root": "/data/images"}}
    assert errors_of(apply_overrides(MINIMAL, ["data.batch_size=x"]))[0].startswith("data.batch_size:")
    assert errors_of(apply_overrides(MINIMAL, ['data.batch_size="16"']))[0].startswith("data.batch_size:")
    for bad, message in [
        ("nokey", "--set nokey: expected KEY.PATH=VALUE"),
        ("a..b=1", "--set a..b=1: expected KEY.PATH=VALUE"),
        ("data.root.x=1", "--set data.root.x=1: data.root.x: parent is not an object"),
    ]:
        with pytest.raises(SpecError) as info:
            apply_overrides(MINIMAL, [bad])
        (line,) = info.value.problems
        assert line.startswith(message), line


def test_data_root_urls_storage_options_and_cache() -> None:
    base = {
        "name": "urls",
        "data": {"root": "s3://bucket/imagenet-packed", "storage_options": {"anon": False}},
    }
    spec = parse_spec(base)
    assert spec.data.root == "s3://bucket/imagenet-packed" and spec.data.cache == "none"
    cached = parse_spec(with_value(with_value(base, "data.cache", "disk"), "data.cache_gb", 100))
    assert spec_hash(cached) == spec_hash(spec)  # how data is reached and cached never changes a sample
    for dotted, value, field in [
        ("data.root", "s3://user:pw@bucket/x", "data.root"),
        ("data.root", "ftp://host/x", "data.root"),
        ("data.storage_options", {"secret": "abc"}, "data.storage_options"),
        ("data.cache", "ssd", "data.cache"),
        ("data.cache_dir", "s3://bucket/cache", "data.cache_dir"),
        ("data.demo", {"num_images": 8, "image_size": 256, "seed": 1}, "data.demo"),
    ]:
        lines = errors_of(with_value(base, dotted, value))
        assert any(line.startswith(field) for line in lines), (dotted, lines)
        assert "pw" not in " ".join(lines) and "abc" not in " ".join(lines)


# ------------------------------------------------------------------------------------------- logging
def test_logging_sinks_never_change_the_spec_hash() -> None:
    """Turning TensorBoard off or W&B on between attempts must not block the resume."""
    wandb = {"project": "pixpro", "entity": "lab", "mode": "offline", "tags": ["r50"], "group": "ablation"}
    changed = with_value(with_value(FULL, "logging.tensorboard", False), "logging.wandb", wandb)
    assert parse_spec(changed).logging.wandb.mode == "offline"  # type: ignore[union-attr]
    assert spec_hash(parse_spec(changed)) == spec_hash(parse_spec(FULL))
    assert "logging" not in hash_payload(parse_spec(changed))


def test_a_wandb_key_in_the_spec_is_refused_and_not_echoed() -> None:
    spec = with_value(MINIMAL, "logging.wandb", {"project": "p", "api_key": "0123456789abcdef-secret"})
    text = "\n".join(errors_of(spec))
    assert "logging.wandb.api_key: a credential key is not allowed" in text
    assert "0123456789abcdef-secret" not in text


@pytest.mark.parametrize(
    ("wandb", "field"),
    [
        ({"mode": "offline"}, "logging.wandb.project"),
        ({"project": "a/b"}, "logging.wandb.project"),
        ({"project": "p", "mode": "sometimes"}, "logging.wandb.mode"),
        ({"project": "p", "tags": ["has space"]}, "logging.wandb.tags[0]"),
    ],
)
def test_bad_wandb_settings_name_their_field(wandb: dict[str, Any], field: str) -> None:
    assert any(e.startswith(f"{field}:") for e in errors_of(with_value(MINIMAL, "logging.wandb", wandb)))


def test_hang_timeout_accepts_30_s_and_up_and_defaults_by_where_the_data_lives() -> None:
    """The watchdog restarts a group whose rank made no progress for this long: below 30 s a slow
    step on a shared machine would pass for a hang; the default doubles for object-store data."""
    assert hang_timeout_s(parse_spec(with_value(MINIMAL, "resources.hang_timeout_s", 30))) == 30
    assert hang_timeout_s(parse_spec(with_value(MINIMAL, "resources.hang_timeout_s", 7200))) == 7200
    assert hang_timeout_s(parse_spec(MINIMAL)) == 300
    assert hang_timeout_s(parse_spec(with_value(MINIMAL, "data.root", "s3://bucket/images"))) == 600
    line = errors_of(with_value(MINIMAL, "resources.hang_timeout_s", 29))[0]
    assert line.startswith("resources.hang_timeout_s:") and "30" in line, line
