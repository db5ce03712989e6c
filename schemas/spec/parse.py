"""Validating loaded data into a :class:`RunSpec`: size first, credentials anywhere, the models, then
the cross-field rules; and the ``--set`` overrides applied to the data before that."""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import ValidationError

from schemas.contract import one_line
from schemas.secrets import secret_paths
from schemas.spec.constants import (
    ANNOTATION_KEYS,
    CREDENTIALS_RULE,
    MAX_KEY_SHOWN,
    MAX_NODES,
    MAX_SPEC_BYTES,
)
from schemas.spec.errors import SpecError, validation_problems
from schemas.spec.rules import model_problems
from schemas.spec.run import RunSpec


def _expanded_size(value: Any, memo: dict[int, tuple[int, int]], depth: int = 0) -> tuple[int, int]:
    """(approximate JSON bytes, values) of ``value`` with every YAML alias expanded, without expanding:
    a shared node is measured once and counted as often as it is referenced."""
    key = id(value)
    if key in memo:
        return memo[key]
    if depth > 64:
        raise SpecError(["spec: nested too deeply"])
    if isinstance(value, dict):
        size, count = 2, 1
        for k, v in value.items():
            sub = _expanded_size(v, memo, depth + 1)
            size, count = size + len(str(k)) + 4 + sub[0], count + 1 + sub[1]
    elif isinstance(value, (list, tuple)):
        size, count = 2, 1
        for v in value:
            sub = _expanded_size(v, memo, depth + 1)
            size, count = size + 2 + sub[0], count + sub[1]
    elif isinstance(value, str):
        size, count = len(value) + 2, 1
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**40:
        size, count = 41, 1  # never str() a huge int (Python refuses above 4300 digits)
    else:
        size, count = len(repr(value)), 1
    if isinstance(value, (dict, list, tuple)):
        memo[key] = (size, count)
    return size, count


def check_size(obj: Any, where: str) -> None:
    size, count = _expanded_size(obj, {})
    if size > MAX_SPEC_BYTES or count > MAX_NODES:
        raise SpecError(
            [
                f"{where}: too large (about {size // 1024} KiB, {count} values with YAML aliases "
                f"expanded; at most {MAX_SPEC_BYTES // 1024} KiB and {MAX_NODES} values)"
            ]
        )


def parse_spec(obj: Any) -> RunSpec:
    """Validate already-loaded data (a dict) into a :class:`RunSpec`, or raise :class:`SpecError`.

    Order matters: size first (an alias bomb must not be walked), then credentials anywhere (a spec
    holding one is refused without echoing any of its values), then types and ranges, then the checks
    that need the backbone table.
    """
    if not isinstance(obj, dict):
        raise SpecError([f"spec: top level must be an object (mapping), got {type(obj).__name__}"])
    check_size(obj, "spec")
    secrets = secret_paths(obj)
    if secrets:
        raise SpecError(
            [f"{_shorten_path(p)}: {why} is not allowed: {CREDENTIALS_RULE}" for p, why in secrets]
        )
    # Editors' "$schema" and authors' "$comment" annotate the file; they are not part of the run.
    bad = [k for k in ANNOTATION_KEYS if k in obj and not isinstance(obj[k], str)]
    if bad:
        raise SpecError([f"{k}: must be a string (got {type(obj[k]).__name__})" for k in sorted(bad)])
    obj = {k: v for k, v in obj.items() if k not in ANNOTATION_KEYS}
    try:
        spec = RunSpec.model_validate(obj)
    except ValidationError as exc:
        raise SpecError(validation_problems(exc)) from None
    except RecursionError:
        raise SpecError(["spec: nested too deeply"]) from None
    problems = model_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


def _shorten_path(path: str) -> str:
    parts = path.split(".")
    return ".".join(p if len(p) <= MAX_KEY_SHOWN else p[: MAX_KEY_SHOWN - 3] + "..." for p in parts)


def override_value(text: str) -> Any:
    """The value ``--set KEY=text`` gives: JSON when it parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with ``a.b.c=value`` overrides applied (``--set``); a value is JSON when it
    parses as JSON (``16``, ``true``, ``[0.2, 1.0]``, ``null``), else the text itself. Validation comes
    after, exactly as for the file, so ``--set data.batch_size=x`` fails like ``"batch_size": "x"``."""
    out = copy.deepcopy(data) if overrides else data  # YAML may hold dates, bytes, sets: not JSON
    for item in overrides:
        shown = one_line(item, 80)
        dotted, eq, text = str(item).partition("=")
        parts = dotted.strip().split(".")
        if not eq or not all(parts):
            raise SpecError([f"--set {shown}: expected KEY.PATH=VALUE, e.g. data.batch_size=16"])
        value = override_value(text)
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not (part.isascii() and part.isdigit() and int(part) < len(node)):  # not '²'
                    raise SpecError([f"--set {shown}: {_shorten_path(where)}: no such list index"])
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise SpecError([f"--set {shown}: {_shorten_path(where)}: parent is not an object"])
    return out
