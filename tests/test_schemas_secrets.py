"""Run spec credentials: refused by key and by value shape anywhere, and never echoed in an error."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import (
    SpecError,
    parse_spec,
)
from tests.support.specs import FULL, MINIMAL, assert_well_formed, errors_of, with_value

# ------------------------------------------------------------------------------------ storage options


@pytest.mark.parametrize(
    "options",
    [
        {"key": "AKIAEXAMPLE"},
        {"SECRET": "hunter2-secret"},
        {"Token": "tok-secret"},
        {"password": "hunter2-secret"},
        {"aws_access_key_id": "AKIAEXAMPLE"},
        {"AWS_SECRET_ACCESS_KEY": "hunter2-secret"},
        {"aws_session_token": "tok-secret"},
        {"client_kwargs": {"aws_secret_access_key": "hunter2-secret", "region_name": "x"}},
        {"config_kwargs": {"deep": {"Password": "hunter2-secret"}}},
        {"client_kwargs": {"list": [{"token": "tok-secret"}]}},
        {"account_key": "hunter2-secret", "bad_type": [1]},
    ],
)
def test_credentials_in_storage_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(with_value(MINIMAL, "checkpoint.storage_options", options))
    text = str(info.value)
    assert_well_formed(info.value)
    assert text.startswith("checkpoint.storage_options.")
    assert "is not allowed: credentials come from the environment" in text
    assert "environment" in text and "never the spec" in text
    for secret in ("AKIAEXAMPLE", "hunter2-secret", "tok-secret"):
        assert secret not in text


def test_secrets_are_never_echoed_from_misplaced_keys() -> None:
    spec = with_value(MINIMAL, "checkpoint.aws_secret_access_key", "hunter2-secret")
    spec = with_value(spec, "storage_options", {"token": "tok-secret"})
    spec = with_value(spec, "checkpoint.url", "s3://AKIA:hunter2-secret@bucket/p")
    text = "\n".join(errors_of(spec))
    assert "hunter2-secret" not in text and "tok-secret" not in text and "AKIA" not in text
    assert "checkpoint.url: a value that looks like a URL with user:password is not allowed" in text
    assert "checkpoint.aws_secret_access_key: a credential key is not allowed" in text
    assert "storage_options.token: a credential key is not allowed" in text


def test_harmless_storage_options_are_accepted() -> None:
    spec = parse_spec(FULL)
    assert spec.checkpoint.storage_options["client_kwargs"] == {"region_name": "us-east-1"}
    assert spec.checkpoint.storage_options["anon"] is False
    assert spec.checkpoint.storage_options["max_retries"] == 3


# --------------------------------------------------------------------------- keys and values anywhere


@pytest.mark.parametrize(
    "key",
    [
        "credential",  # adlfs
        "api_key",
        "API-KEY",
        "apiKey",
        "x-api-key",
        "Authorization",
        "token",
        "refresh_token",
        "client_secret",
        "Password",
        " password ",
        "\u200bpassword",
        "pass\u200bword",
        "AWS.Secret.Access.Key",
        "sas_token",
        "connection_string",
        "private_key",
        "key",
    ],
)
def test_secret_keys_are_refused_after_normalisation(key: str) -> None:
    from schemas.secrets import is_secret_key

    assert is_secret_key(key)
    for where in (
        "checkpoint.storage_options",
        "checkpoint.storage_options.client_kwargs.headers",
        "resources.extra_sbatch",
    ):
        lines = errors_of(with_value(MINIMAL, where, {key: "hunter2-secret"}))
        assert len(lines) == 1 and "a credential key is not allowed" in lines[0], lines
        assert "hunter2-secret" not in lines[0]


@pytest.mark.parametrize(
    "key", ["endpoint_url", "region_name", "profile", "anon", "account_name", "SSEKMSKeyId", "use_ssl"]
)
def test_harmless_keys_are_not_secrets(key: str) -> None:
    from schemas.secrets import is_secret_key

    assert not is_secret_key(key)
    parse_spec(with_value(MINIMAL, "checkpoint.storage_options", {key: "us-east-1"}))


@pytest.mark.parametrize(
    ("dotted", "value", "what"),
    [
        ("checkpoint.storage_options.client_kwargs.endpoint_url", "http://u:hunter2@h:9000", "user:password"),
        ("checkpoint.url", "s3://minio:hunter2@bucket/p", "user:password"),
        ("checkpoint.storage_options.profile", "AKIAABCDEFGHIJKLMNOP", "AWS access key id"),
        ("resources.extra_sbatch.comment", "Bearer abcdefghijklmnopqrs", "authorization value"),
        ("resources.extra_sbatch.comment", "AccountKey=abcdEFGH==;", "connection string"),
        ("data.root", "https://acct.blob.core.windows.net/c?sv=1&sig=hunter2", "signed-URL signature"),
        ("checkpoint.storage_options.headers", ["ghp_abcdefghijklmnopqrstuvwxyz012345"], "GitHub token"),
    ],
)
def test_secret_values_are_refused_by_shape_anywhere(dotted: str, value: Any, what: str) -> None:
    lines = errors_of(with_value(MINIMAL, dotted, value))
    assert len(lines) == 1 and what in lines[0] and "is not allowed" in lines[0], lines
    assert lines[0].startswith(dotted.split(".")[0])
    for part in ("hunter2", "AKIAABCD", "abcdefghijklmnopqrs", "abcdEFGH", "ghp_"):
        assert part not in lines[0]


def test_redact_hides_what_the_validator_refuses() -> None:
    from schemas.secrets import MASK, redact, secret_value_problem

    data = {
        "endpoint_url": "http://u:pw12345@host/x",
        "Api-Key": "k-123456",
        "nested": [{"token": "t-123456"}, "AKIAABCDEFGHIJKLMNOP"],
        "region_name": "us-east-1",
    }
    out = redact(data)
    assert out == {
        "endpoint_url": f"http://{MASK}@host/x",
        "Api-Key": MASK,
        "nested": [{"token": MASK}, MASK],
        "region_name": "us-east-1",
    }
    assert data["Api-Key"] == "k-123456"  # a copy
    text = redact("connect password=hunter2 to http://u:pw@h with Authorization: Bearer abcdefghijkl")
    assert "hunter2" not in text and "pw@" not in text and "abcdefghijkl" not in text, text
    assert redact(7) == 7 and secret_value_problem("plain words") is None
    prose = "NoCredentialsError: Unable to locate credentials"
    assert redact(prose) == prose  # an exception's name is not a key=value pair


def test_a_wandb_key_in_the_spec_is_refused_and_not_echoed() -> None:
    spec = with_value(MINIMAL, "logging.wandb", {"project": "p", "api_key": "0123456789abcdef-secret"})
    text = "\n".join(errors_of(spec))
    assert "logging.wandb.api_key: a credential key is not allowed" in text
    assert "0123456789abcdef-secret" not in text
