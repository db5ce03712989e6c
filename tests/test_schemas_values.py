"""Run spec field values: the paper defaults, each constraint, strict types, sbatch options, data URLs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import schemas
from schemas import (
    OWNED_SBATCH_OPTIONS,
    SpecError,
    hang_timeout_s,
    json_schema,
    load_spec,
    parse_spec,
    spec_hash,
)
from tests.support.specs import FULL, MINIMAL, assert_well_formed, errors_of, with_value

# ------------------------------------------------------------------------------------------- defaults


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
    assert r.startup_timeout_s == 1800


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


# ---------------------------------------------------------------------------------------- constraints


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
    ("resources.startup_timeout_s", 59, "resources.startup_timeout_s"),
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


# --------------------------------------------------------------------------------------- extra_sbatch


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


# --------------------------------------------------------------------------------------- strict types


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
