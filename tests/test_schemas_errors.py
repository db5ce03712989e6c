"""Run spec errors: every problem at once, one short line each, naming the field path and a likely fix."""

from __future__ import annotations

import pickle

import pytest

from schemas import (
    SpecError,
)
from tests.support.specs import MINIMAL, errors_of, with_value

# ------------------------------------------------------------------------------- one line per problem


def test_every_problem_is_reported_at_once() -> None:
    bad = with_value(with_value(with_value(MINIMAL, "seed", -1), "optim.epochs", 0), "resources.nodes", 0)
    lines = errors_of(bad)
    assert [line.split(":")[0] for line in lines] == ["seed", "optim.epochs", "resources.nodes"]
    assert lines[0] == "seed: Input should be greater than or equal to 0 (got -1)"


def test_long_values_are_truncated_in_messages() -> None:
    (line,) = errors_of(with_value(MINIMAL, "name", "é" * 500))
    assert line.startswith("name: String should match pattern") and "..." in line
    assert len(line) < 200


def test_huge_keys_and_values_are_shortened() -> None:
    key = "k" * 1_000_000
    for spec in ({**MINIMAL, key[:100_000]: 1}, with_value(MINIMAL, "name", "é" * 100_000)):
        lines = errors_of(spec)
        assert len(lines) == 1 and len(lines[0]) <= 200, len(lines[0])
    assert errors_of({**MINIMAL, key: 1})[0].startswith("spec: too large")


def test_spec_error_is_a_value_error_and_pickles() -> None:
    err = SpecError(["a: one", "b: two", "a: one"])
    assert isinstance(err, ValueError) and str(err) == "a: one\nb: two"
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems and str(again) == str(err)


# --------------------------------------------------------------------------------------- unknown keys


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
