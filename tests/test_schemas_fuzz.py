"""Fuzzed specs and spec files: parse_spec and load_spec give a RunSpec or a one-line-per-problem error."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from schemas import (
    RunSpec,
    SpecError,
    load_spec,
    parse_spec,
    spec_hash,
)
from tests.support.specs import FULL, MINIMAL, assert_well_formed

# ----------------------------------------------------------------------------------------------- fuzz


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
