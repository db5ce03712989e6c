"""Reading a spec file: YAML (``.yaml``/``.yml``, imported only here and only when needed) or JSON, with
duplicate keys refused and every problem reported as one line with its position."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from schemas.contract import one_line
from schemas.spec.constants import MAX_SPEC_BYTES
from schemas.spec.errors import SpecError
from schemas.spec.parse import apply_overrides, check_size, parse_spec
from schemas.spec.run import RunSpec


def _reject_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


@functools.cache
def _yaml_loader() -> type:
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last one)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            except TypeError:
                continue  # unhashable: construct_mapping reports it with its position
        loader.flatten_mapping(node)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    # YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-5`` as a string, which strict types would refuse.
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return StrictLoader


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_yaml(text: str, where: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        detail = " ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        raise SpecError([f"{where}{pos}: invalid YAML: {_one_line(detail)}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{where}: invalid YAML: {_one_line(str(exc))}"]) from None
    except RecursionError:
        raise SpecError([f"{where}: invalid YAML: nested too deeply"]) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp like 2024-13-45
        raise SpecError([f"{where}: invalid YAML: {_one_line(str(exc))}"]) from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_pairs)
    except json.JSONDecodeError as exc:
        raise SpecError([f"{where}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    except _DuplicateKey as exc:
        raise SpecError([f"{where}: invalid JSON: duplicate key {exc.args[0]!r}"]) from None
    except RecursionError:
        raise SpecError([f"{where}: invalid JSON: nested too deeply"]) from None
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        raise SpecError([f"{where}: invalid JSON: {_one_line(str(exc))}"]) from None


def load_spec_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a spec file (YAML for .yaml/.yml, else JSON) into data, not yet validated. Every problem
    with the path or its contents (missing, a folder, unreadable, a name too long, too large, not UTF-8,
    bad syntax) is a :class:`SpecError` of one line."""
    p = Path(path)
    where = one_line(p, 120)
    try:
        if not p.is_file():
            raise SpecError([f"{where}: {'not a file' if p.exists() else 'no such file'}"])
        with p.open("rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"{where}: cannot read: {_one_line(exc.strerror or str(exc))}"]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([f"{where}: larger than {MAX_SPEC_BYTES // 1024} KiB; a run spec is a few KiB"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{where}: not UTF-8 text ({_one_line(exc.reason)} at byte {exc.start})"]) from None
    is_yaml = p.suffix.lower() in (".yaml", ".yml")
    data = _parse_yaml(text, where) if is_yaml else _parse_json(text, where)
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise SpecError([f"{where}: top level must be an object (mapping), got {kind}"])
    check_size(data, where)
    return data


def load_spec(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read a spec file, apply ``--set`` overrides and validate it, or raise :class:`SpecError`."""
    return parse_spec(apply_overrides(load_spec_data(path), overrides))
