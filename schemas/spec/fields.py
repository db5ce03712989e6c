"""The strict base model every spec section extends, and the field types and value checks they share.

A check raises a pydantic error with our own type name and a finished message, so the error renderer
(:mod:`schemas.spec.errors`) shows it as it stands."""

from __future__ import annotations

import functools
import math
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, StringConstraints, model_validator
from pydantic.functional_validators import BeforeValidator, PlainValidator
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

from schemas.secrets import secret_paths
from schemas.spec.constants import (
    CREDENTIALS_HINT,
    MAX_NESTING,
    SBATCH_KEY_PATTERN,
    SBATCH_VALUE_PATTERN,
    SLURM_WORD_PATTERN,
    URL_SCHEMES,
)


@functools.cache
def _int_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """Fields of ``model`` typed ``int`` or ``int | None``."""
    names = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        union = get_origin(ann) in (Union, types.UnionType)
        if ann is int or (union and int in get_args(ann)):
            names.append(name)
    return tuple(names)


def kind_required(schema: dict[str, Any]) -> None:
    """pydantic picks a spatial transform by its ``kind`` key, so the schema requires it too."""
    schema["required"] = sorted({*schema.get("required", []), "kind"})


class SpecModel(BaseModel):
    """Shared config: unknown keys are errors, NaN/inf are refused, defaults are validated too (so a
    default written as ``5`` is stored as ``5.0`` exactly like a user's ``5`` and hashes the same)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        """``16.0`` is an integer to JSON Schema; strict mode alone would refuse it for an ``int`` field."""
        if not isinstance(data, dict):
            return data
        fixed = None
        for name in _int_fields(cls):
            value = data.get(name)
            if isinstance(value, float) and value.is_integer():
                fixed = fixed if fixed is not None else dict(data)
                fixed[name] = int(value)
        return data if fixed is None else fixed


def fail(kind: str, message: str) -> PydanticCustomError:
    """A validation error with our own type name and a finished message (no "Value error, " prefix)."""
    return PydanticCustomError(kind, message)  # no context: braces in the message stay literal


def _list_to_tuple(value: Any) -> Any:
    """JSON and YAML have no tuples: a 2-element array is the pair (strict mode would refuse a list)."""
    return tuple(value) if isinstance(value, list) else value


def json_int(value: Any) -> Any:
    """An integer as JSON Schema means it: ``16`` or ``16.0``, never ``true``, ``"16"`` or ``16.5``
    (strict mode alone would refuse ``16.0``, which the exported schema accepts)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail("int_type", "Input should be a valid integer")
    return value


Pair = Annotated[tuple[float, float], BeforeValidator(_list_to_tuple)]


def check_range_pair(value: tuple[float, float], lo_min: float, hi_max: float | None) -> tuple[float, float]:
    lo, hi = value
    if not lo > lo_min:
        raise fail("range_pair", f"lower bound must be > {lo_min}")
    if hi < lo:
        raise fail("range_pair", "lower bound must be <= upper bound")
    if hi_max is not None and hi > hi_max:
        raise fail("range_pair", f"upper bound must be <= {hi_max}")
    return value


def _storage_value(value: Any, depth: int = 0) -> Any:
    """Accept JSON data only: storage_options go to fsspec and into job records, both need JSON."""
    if depth > MAX_NESTING:
        raise fail("nested_too_deep", f"nested more than {MAX_NESTING} levels")
    if value is None and depth > 0:
        return None
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise fail("finite_number", "Input should be a finite number")
        return value
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise fail("invalid_key", "object keys must be strings")
        return {k: _storage_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and depth > 0:
        return [_storage_value(v, depth + 1) for v in value]
    expected = "a string, number, boolean or object" if depth == 0 else "JSON data"
    raise fail("storage_option_type", f"Input should be {expected}")


StorageOptionValue = Annotated[
    Any,
    PlainValidator(_storage_value),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "integer"},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "object"},
            ]
        }
    ),
]


def refuse_credentials(value: Any) -> Any:
    """storage_options: before the type checks, so a credential is refused even when another option is
    malformed (parse_spec refuses them for the whole spec first; this guards direct model validation)."""
    if secret_paths(value):
        raise fail("credentials", CREDENTIALS_HINT)
    return value


def check_url(value: str | None) -> str | None:
    """A plain path, or a URL of a supported scheme without user-info (credentials come from the
    environment) and with a bucket where the scheme needs one."""
    if value is None:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise fail("url_control_chars", "must not contain control characters")
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)\Z", value, re.DOTALL)
    if match is None:
        return value  # a plain local path
    scheme, rest = match.group(1), match.group(2)
    if scheme.lower() not in URL_SCHEMES:
        raise fail(
            "url_scheme",
            f"unsupported scheme {scheme!r}; use one of "
            f"{', '.join(s + '://' for s in URL_SCHEMES)} or a plain path",
        )
    netloc = rest.split("/", 1)[0]
    if "@" in netloc:
        raise fail(
            "credentials",
            "must not embed user info (user[:secret]@); credentials come from the environment",
        )
    if scheme.lower() in ("s3", "gs", "az") and not netloc:
        raise fail("url_bucket", f"{scheme}:// URL needs a bucket or container")
    return value


def check_required_url(value: str) -> str:
    """:func:`check_url` of a field that has no None."""
    checked = check_url(value)
    assert checked is not None
    return checked


def _number_to_str(value: Any) -> Any:
    """YAML reads ``nice: 10`` as an int; sbatch values are text either way (``10.0`` is an integer to
    JSON Schema, so it is ``10`` here too)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


SbatchKey = Annotated[str, StringConstraints(pattern=SBATCH_KEY_PATTERN)]
SbatchValue = Annotated[
    str,
    StringConstraints(pattern=SBATCH_VALUE_PATTERN, max_length=1024),
    BeforeValidator(_number_to_str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": SBATCH_VALUE_PATTERN, "maxLength": 1024},
                {"type": "integer"},
            ]
        }
    ),
]
SlurmWord = Annotated[str, StringConstraints(pattern=SLURM_WORD_PATTERN, max_length=256)]
Url = Annotated[
    str,
    StringConstraints(min_length=1, max_length=4096),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 4096,
            "pattern": r"^(?:(?:[Ff][Ii][Ll][Ee]|[Ss]3|[Gg][Ss]|[Aa][Zz]|[Mm][Ee][Mm][Oo][Rr][Yy])://"
            r"|(?![A-Za-z][A-Za-z0-9+.-]*://))",
        }
    ),
]
