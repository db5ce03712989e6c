"""Property-based fuzz of run specs: the validator against the exported JSON Schema, and ``pixpro
validate`` (in-process) against mutations of both example specs, written as JSON or YAML.

Every rejected spec must end in exit 2 with one line per problem, each naming its field, short, with
no traceback and no credential echoed; specs the schema accepts must pass the validator unless a rule
the schema cannot express (``CROSS_FIELD_RULES``) or the secrets policy refuses them; a sample of the
accepted mutations passes the preflight. Fast on purpose (seconds, no subprocess per case).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from schemas import CROSS_FIELD_RULES, SpecError, json_schema, parse_spec
from tests.support.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json_schema()
DEFS = SCHEMA["$defs"]
EXAMPLES = {
    name: json.loads((REPO / "launch/specs" / f"{name}.json").read_text())
    for name in ("demo", "imagenet_r50_100ep")
}
SECRET_MARKERS = ("hunter2-Secret-9", "AKIAZZZZZZZZZZZZZZZZ", "tok-Secret-77")
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
SCHEMA_CASES = 800
"""Specs generated from the exported schema per run (test_validator_agrees_with_the_exported_schema)."""
MUTATION_CASES = 1300
"""Mutated example specs per run (test_fuzz_mutated_examples_exit_2_one_line_per_problem)."""


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """JSON Schema patterns are ECMA-262: ``$`` is the end of input (Python's ``$`` also matches before
    a final newline, which would make the reference validator accept ``"name\\n"``)."""
    if isinstance(instance, str):
        python = re.sub(r"(?<!\\)\$$", r"\\Z", pattern)
        if not re.search(python, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


REFERENCE = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _ecma_pattern})(SCHEMA)


# ------------------------------------------------------------------------- generating from the schema
def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = DEFS[node["$ref"].rsplit("/", 1)[-1]]
    return node


_WRONG = st.sampled_from([None, True, False, "16", "x", -1, 0, 1.5, 1e300, [], {}, [1, 2, 3], {"a": 1}])


_STRATEGIES: dict[int, st.SearchStrategy[Any]] = {}


def from_schema(node: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values the schema node accepts (mostly): every keyword the exported schema uses is honoured.
    Built once per schema node (building strategies per draw would dominate the run time)."""
    node = _resolve(node)
    if id(node) not in _STRATEGIES:
        _STRATEGIES[id(node)] = _build(node, depth)
    return _STRATEGIES[id(node)]


def _build(node: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
    if "anyOf" in node or "oneOf" in node:
        return st.one_of([from_schema(n, depth) for n in node.get("anyOf", node.get("oneOf"))])
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "object":
        return _object(node, depth)
    if kind == "array":
        if "prefixItems" in node:
            return st.tuples(*[from_schema(n, depth + 1) for n in node["prefixItems"]]).map(list)
        return st.lists(from_schema(node.get("items", {}), depth + 1), max_size=3)
    if kind == "integer":
        lo = node.get("minimum", node.get("exclusiveMinimum", -(2**40)) + ("exclusiveMinimum" in node))
        hi = node.get("maximum", 2**40)
        edges = [v for v in (lo, lo + 1, hi) if lo <= v <= hi]
        return st.one_of(st.sampled_from(edges), st.integers(lo, min(hi, lo + 5000)))
    if kind == "number":
        lo, hi = node.get("minimum"), node.get("maximum")
        xlo, xhi = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
        return st.floats(
            min_value=lo if lo is not None else xlo,
            max_value=hi if hi is not None else xhi,
            exclude_min=xlo is not None,
            exclude_max=xhi is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "string":
        if "pattern" in node:
            return st.from_regex(node["pattern"].replace("$", r"\Z"), fullmatch=True).filter(
                lambda s: len(s) <= node.get("maxLength", 10**9) and len(s) >= node.get("minLength", 0)
            )
        return st.text(min_size=node.get("minLength", 0), max_size=12)
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=6), _containers, max_leaves=4
    )


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=6), inner, max_size=2)


def _object(node: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
    props: dict[str, Any] = node.get("properties", {})
    required = set(node.get("required", []))
    if not props:  # a map: storage_options, extra_sbatch
        if "patternProperties" in node:
            (pattern, values), *_ = node["patternProperties"].items()
            keys = st.from_regex(pattern.replace("$", r"\Z"), fullmatch=True).filter(lambda k: len(k) < 20)
        else:
            keys, values = st.text(min_size=1, max_size=10), node.get("additionalProperties", {})
        return st.dictionaries(keys, from_schema(values, depth + 1), max_size=3)

    subs = {name: from_schema(sub, depth + 1) for name, sub in props.items()}

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, strategy in subs.items():
            if name in required or draw(st.integers(0, 3)) == 0:
                out[name] = draw(strategy)
        return out

    return build()


@st.composite
def schema_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A spec drawn from the schema, then 0-2 mutations (wrong type, unknown key, dropped key)."""
    spec = draw(from_schema(SCHEMA))
    for _ in range(draw(st.integers(0, 2))):
        objects = [spec, *[v for v in spec.values() if isinstance(v, dict)]]
        target = draw(st.sampled_from(objects))
        how = draw(st.sampled_from(["wrong", "unknown", "drop"]))
        if how == "unknown":
            target[draw(st.text(min_size=1, max_size=8).filter(lambda k: not k.startswith("$")))] = 1
        elif target and how == "wrong":
            target[draw(st.sampled_from(sorted(target)))] = draw(_WRONG)
        elif target:
            target.pop(draw(st.sampled_from(sorted(target))))
    return spec


def _cross_field_or_secret(line: str) -> bool:
    path = line.split(": ", 1)[0]
    path = re.sub(r"\[\d+\].*$", "", path)
    return "is not allowed: credentials" in line or any(
        path == f or path.startswith(f + ".") for f in CROSS_FIELD_RULES
    )


def test_validator_agrees_with_the_exported_schema() -> None:
    """Generated from the schema: what the schema rejects, the validator rejects; what it accepts, the
    validator accepts unless a documented cross-field rule or the secrets policy says no."""
    tried = {"accepted": 0, "rejected": 0}

    @settings(
        max_examples=SCHEMA_CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(spec=schema_specs())
    def check(spec: dict[str, Any]) -> None:
        schema_ok = REFERENCE.is_valid(spec)
        try:
            parse_spec(copy.deepcopy(spec))
        except SpecError as exc:
            tried["rejected"] += 1
            event("rejected")
            if schema_ok:
                bad = [p for p in exc.problems if not _cross_field_or_secret(p)]
                assert not bad, (bad, spec)
        else:
            tried["accepted"] += 1
            event("accepted")
            assert schema_ok, ([e.message for e in REFERENCE.iter_errors(spec)][:3], spec)

    check()
    print(f"schema cases tried: {tried}")
    assert sum(tried.values()) >= SCHEMA_CASES, tried  # every generated spec was checked
    assert tried["accepted"] >= 50 and tried["rejected"] >= 50, tried


# ---------------------------------------------------------------------- mutating the example specs
def _leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in _leaf_paths(v, (*prefix, k))]
    return [prefix]


_PATHS = {
    name: [p for p in _leaf_paths(spec) if p[0] not in ("$schema", "$comment")]
    for name, spec in EXAMPLES.items()
}


_BAD_VALUES: list[Any] = [
    "16", "true", True, False, None, -1, 0, 1, 2**70, 1.5, 1e-320, 1e308, "", " ", "x" * 300, [], {},
    [0.5], [1, 0.5], {"k": 1}, "resnet5", "vit_b_16", "-leading", "..", "S3://b/p",
    "http://user:hunter2-Secret-9@host/x", "AKIAZZZZZZZZZZZZZZZZ", "Bearer tok-Secret-77abcdef",
]  # fmt: skip
_SECRET_KEYS = ["password", "Api-Key", "\u200bSECRET_access_key ", "credential", "Authorization", "sas_token"]
_WHERE = [(), ("data",), ("checkpoint",), ("checkpoint", "storage_options"), ("resources", "extra_sbatch")]


@st.composite
def mutated_example(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[str]]:
    """One example spec with 1-3 mutations: a bad value at a real field, an unknown or secret key, a
    dropped key, a huge key, or a --set override."""
    name = draw(st.sampled_from(sorted(EXAMPLES)))
    spec = copy.deepcopy(EXAMPLES[name])
    overrides: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["value", "value", "unknown", "secret", "drop", "long_key", "set"]))
        path = draw(st.sampled_from(_PATHS[name]))
        parent = spec
        for key in path[:-1]:
            parent = parent.setdefault(key, {}) if isinstance(parent, dict) else parent
        if not isinstance(parent, dict):
            continue
        if how == "value":
            parent[path[-1]] = draw(st.sampled_from(_BAD_VALUES))
        elif how == "drop":
            parent.pop(path[-1], None)
        elif how in ("unknown", "secret", "long_key"):
            where = spec
            for key in draw(st.sampled_from(_WHERE)):
                where = where.setdefault(key, {}) if isinstance(where, dict) else where
            if isinstance(where, dict):
                key = {
                    "unknown": draw(st.text(min_size=1, max_size=10).filter(lambda k: not k.startswith("$"))),
                    "secret": draw(st.sampled_from(_SECRET_KEYS)),
                    "long_key": "k" * draw(st.integers(200, 5000)),
                }[how]
                where[key] = draw(st.sampled_from(SECRET_MARKERS)) if how == "secret" else 1
        else:
            value = draw(st.sampled_from(_BAD_VALUES))
            overrides.append(f"{'.'.join(path)}={json.dumps(value)}")
    return name, spec, overrides


def _check_rejection(code: int, out: str, err: str) -> None:
    assert code == 2, (code, out, err)
    assert out == "" and "Traceback" not in err and "internal error" not in err, err
    lines = err.splitlines()
    assert lines, err
    for line in lines:
        assert line.startswith("pixpro: ") and len(line) <= 210, line
        # names its field (a dotted path, a file, or the --set/flag it came from) before ": "
        plain = re.sub(r"""\[(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\]]*)\]""", "[k]", line)
        assert re.match(r"^pixpro: (--set \S+: )?[^\s:][^:]*: \S", plain), line
    for secret in SECRET_MARKERS:
        assert secret not in err, (secret, err)


def test_fuzz_mutated_examples_exit_2_one_line_per_problem(tmp_path: Path) -> None:
    """The two example specs, mutated: every rejection is exit 2, one short line per problem naming its
    field, no traceback, no secret echoed; accepted ones go on to the preflight sample below."""
    tried = {"accepted": 0, "rejected": 0}

    @settings(
        max_examples=MUTATION_CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=mutated_example(), as_yaml=st.booleans())
    def check(case: tuple[str, dict[str, Any], list[str]], as_yaml: bool) -> None:
        name, spec, overrides = case
        path = tmp_path / ("spec.yaml" if as_yaml else "spec.json")
        path.write_text(yaml.dump(spec, Dumper=DUMPER) if as_yaml else json.dumps(spec))
        args = ["validate", str(path)] + [a for o in overrides for a in ("--set", o)]
        code, out, err = run_cli(*args)
        if code == 0:
            tried["accepted"] += 1
            resolved = json.loads(out)
            assert all(secret not in out for secret in SECRET_MARKERS)
            if name == "demo":
                ACCEPTED.append(resolved)
            return
        tried["rejected"] += 1
        _check_rejection(code, out, err)

    check()
    print(f"mutation cases tried: {tried}")
    assert sum(tried.values()) >= MUTATION_CASES, tried  # every generated mutation was checked
    assert tried["rejected"] >= 900 and tried["accepted"] >= 10, tried


ACCEPTED: list[dict[str, Any]] = []


@pytest.mark.slow
def test_a_sample_of_accepted_mutations_passes_the_preflight(tmp_path: Path) -> None:
    """Accepted specs must also start: the preflight (model step, data samples, checkpoint probe) runs
    in-process on a few accepted demo mutations."""
    from launch import preflight

    sample = ACCEPTED[:: max(1, len(ACCEPTED) // 2)][:2] if ACCEPTED else []
    if not sample:  # this test alone (-k): a fresh accepted mutation
        sample = [json.loads(run_cli("validate", str(REPO / "launch/specs/demo.json"))[1])]
    for i, resolved in enumerate(sample):
        resolved["data"]["root"] = str(tmp_path / f"data{i}")
        resolved["checkpoint"]["url"] = str(tmp_path / f"ckpt{i}")
        resolved["model"]["projector_hidden"] = min(resolved["model"]["projector_hidden"], 256)
        result = preflight.run(parse_spec(resolved))
        assert result["ok"] and result["samples"] == preflight.SAMPLES, result


def test_fuzz_tried_at_least_2000_cases() -> None:
    """The CI budget the issue asks for: at least 2,000 generated specs per run (schema + mutations).
    Each fuzz test asserts that it checked its whole share, so this holds whenever both pass, in any
    order and alone."""
    assert SCHEMA_CASES + MUTATION_CASES >= 2000
