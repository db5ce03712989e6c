"""The exported JSON Schema of a run spec (``python -m schemas``), for editors and docs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.spec.run import RunSpec

SCHEMA_PATH = Path(__file__).parents[1] / "run_spec.schema.json"
"""The exported JSON Schema (package data); regenerate with ``python -m schemas --write``."""


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a run spec, for editors and docs; ``$schema``/``$comment`` are
    allowed so a spec file can point an editor at this schema and say what it is for."""
    schema = RunSpec.model_json_schema()
    annotations = {
        "$schema": {"type": "string", "description": "Where editors find this schema (ignored by pixpro)."},
        "$comment": {"type": "string", "description": "Free text for readers (ignored by pixpro)."},
    }
    schema["properties"] = {**annotations, **schema["properties"]}
    return schema


def json_schema_text() -> str:
    """The exact text of ``run_spec.schema.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=True) + "\n"
