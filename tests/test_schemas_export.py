"""The exported JSON Schema: current, valid, documented, agreeing with the models; a torch-free import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from schemas import (
    SCHEMA_PATH,
    SpecError,
    json_schema,
    json_schema_text,
    load_spec,
    parse_spec,
)
from tests.support.specs import FULL, MINIMAL, REPO, errors_of, with_value

# --------------------------------------------------------------------------------------------- schema


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


def test_example_specs_validate_against_the_exported_schema() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    for path in sorted((REPO / "launch/specs").glob("*.json")):
        data = json.loads(path.read_text())
        assert data["$schema"] == "../../schemas/run_spec.schema.json" and data["$comment"], path
        assert (path.parent / data["$schema"]).resolve() == SCHEMA_PATH.resolve()
        validator.validate(data)
        load_spec(path)
    assert errors_of({**MINIMAL, "$comment": 5}) == ["$comment: must be a string (got int)"]
