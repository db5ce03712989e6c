"""Run spec files: YAML and JSON loading, file-level problems with positions, size bounds, --set overrides."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from schemas import (
    SpecError,
    load_spec,
    parse_spec,
)
from tests.support.specs import FULL, MINIMAL, assert_well_formed, errors_of

# ---------------------------------------------------------------------------------------------- files


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


def test_yaml_exponent_floats_are_numbers(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("data: {root: x}\noptim: {weight_decay: 1e-5, final_lr: -0E+0, base_lr: 2e0}\n")
    spec = load_spec(path)
    assert (spec.optim.weight_decay, spec.optim.final_lr, spec.optim.base_lr) == (1e-5, 0.0, 2.0)


# -------------------------------------------------------------------------------------- bounded input


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


# ------------------------------------------------------------------------------------------ overrides


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


def test_set_overrides_a_yaml_spec_whose_values_are_not_json() -> None:
    """YAML gives dates, bytes and sets that JSON has not: ``--set`` copies the spec as it is, and the
    value is refused by validation (exit 2), not by the copy (an internal error)."""
    import datetime

    from schemas import apply_overrides

    with pytest.raises(SpecError, match="no such list index"):  # a digit, but not one int() reads
        apply_overrides(MINIMAL, ["data.crop_scale=[0.2, 1]", "data.crop_scale.\u00b2=0.3"])
    for odd in (datetime.date(2024, 1, 1), b"\x00", {1, 2}):
        data = apply_overrides({**MINIMAL, "name": odd}, ["seed=1"])
        assert data["seed"] == 1 and data["name"] == odd
        assert errors_of(data)[0].startswith("name:")
