"""The one secrets policy: which keys and which values are credentials, and how to hide them.

A run spec is copied into run records, sbatch scripts, logs and error messages, so it must never hold
a credential: those come from the environment or named profiles (``AWS_*`` variables, ``profile``,
instance roles). The spec validator refuses what this module flags, and the checkpoint store redacts
with the same rules, so "refused in a spec" and "hidden in a record or log" can never drift apart.

Keys are normalised before matching (case, separators ``_ - . space``, camelCase, surrounding and
zero-width whitespace), so ``Access-Key``, ``accessKey`` and ``\\u200baccess_key `` are one key. Values
are judged by shape, whatever key holds them: cloud key ids, user:password in URLs, bearer/basic
authorization values, private keys, well-known token formats, signed-URL signatures.

Torch-free and dependency-free (the CLI imports it on login nodes).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = [
    "MASK",
    "is_secret_key",
    "normalize_key",
    "redact",
    "secret_paths",
    "secret_value_problem",
]

MASK = "***"
_MAX_DEPTH = 32
_MAX_SCAN = 100_000  # longest string judged by shape; longer strings are cut first (bounded regex time)

# Characters that print as nothing: a key with one inside still means the same key to a reader.
_INVISIBLE = re.compile(r"[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e"
                        r"\u2060-\u2064\u206a-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]")  # fmt: skip
_SEPARATORS = re.compile(r"[\s_.\-/:]+")

# Matched anywhere in a normalised key (lower case, no separators).
_SECRET_KEY_PARTS = re.compile(
    r"secret|passw|passphrase|pwd|token|credential|apikey|accesskey|privatekey|accountkey|sessionkey"
    r"|signingkey|masterkey|sharedkey|authorization|authheader|bearer|sastoken|sasurl|connectionstring"
    r"|connstr|cookie|sessionid|clientassertion|refreshtoken"
)
# Matched as the whole normalised key.
_SECRET_KEY_WHOLE = frozenset({"key", "pass", "auth", "sas", "sig", "signature", "jwt", "otp", "pin", "mfa"})
# Names with a secret-looking part that hold an identifier, never the secret itself.
_SAFE_KEYS = frozenset({"ssekmskeyid", "kmskeyid", "keyname", "tokenurl", "tokenendpoint"})

_VALUE_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])"),
     "an AWS access key id"),
    (re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s@?#]*:[^/\s@?#]*@"), "a URL with user:password"),
    (re.compile(r"(?i)\b(?:bearer|basic|token|digest)\s+[A-Za-z0-9._~+/=-]{8,}"), "an authorization value"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), "a GitHub token"),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), "a Slack token"),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), "a Google API key"),
    (re.compile(r"\bya29\.[0-9A-Za-z_-]{20,}"), "a Google OAuth token"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "an API secret key"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), "a JSON web token"),
    (re.compile(r"(?i)(?:^|[?&;])(?:sig|x-amz-signature|x-amz-credential|x-goog-signature|"
                r"x-goog-credential)=[^&\s]+"), "a signed-URL signature"),
    (re.compile(r"(?i)\b(?:accountkey|sharedaccesskey|sharedaccesssignature|password|pwd)\s*=\s*[^;\s]+"),
     "a connection string with a key or password"),
)  # fmt: skip


def normalize_key(key: str) -> str:
    """Lower case, no invisible characters, no separators, camelCase split away: one spelling per key."""
    text = unicodedata.normalize("NFKC", str(key))
    text = _INVISIBLE.sub("", text).strip()
    return _SEPARATORS.sub("", text).lower()


def is_secret_key(key: Any) -> bool:
    """Whether a mapping key names a credential (``password``, ``Api-Key``, ``credential``, ...)."""
    if not isinstance(key, str):
        return False
    norm = normalize_key(key)
    if not norm or norm in _SAFE_KEYS:
        return False
    return norm in _SECRET_KEY_WHOLE or _SECRET_KEY_PARTS.search(norm) is not None


def secret_value_problem(value: Any) -> str | None:
    """What credential a value looks like (``"an AWS access key id"``), or None. Strings only."""
    if not isinstance(value, str) or len(value) < 8:
        return None
    text = _INVISIBLE.sub("", value[:_MAX_SCAN])
    for pattern, what in _VALUE_SHAPES:
        if pattern.search(text):
            return what
    return None


def secret_paths(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(path, why)`` for every secret key and secret-shaped string (or key) in nested data.

    Paths are dotted (``checkpoint.storage_options.client_kwargs.Authorization``, ``data.spatial[0]``);
    data nested deeper than the policy looks counts as a secret (it cannot be shown to be clean).
    """
    found: list[tuple[str, str]] = []
    _walk(value, prefix, 0, found)
    return found


def _walk(value: Any, path: str, depth: int, found: list[tuple[str, str]]) -> None:
    if depth > _MAX_DEPTH:
        found.append((path or "spec", "nested too deeply to check for credentials"))
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if is_secret_key(key):
                found.append((sub, "a credential key"))
                continue
            problem = secret_value_problem(key)
            if problem:
                found.append((path or "spec", f"a key that looks like {problem}"))
                continue
            _walk(item, sub, depth + 1, found)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", depth + 1, found)
    else:
        problem = secret_value_problem(value)
        if problem:
            found.append((path or "spec", f"a value that looks like {problem}"))


T = TypeVar("T")


def redact(data: T) -> T:
    """A copy of ``data`` with every credential replaced by ``***``.

    Mappings/lists: values of secret keys become ``***``, secret-shaped strings are masked. Text: the
    secret-shaped parts are masked, and so are ``key=value`` / ``key: value`` pairs whose key is a
    secret key (``password=hunter2``, ``Authorization: Bearer ...``). Other types pass unchanged.
    """
    return _redact(data, 0)


_PAIR = re.compile(
    r"""(?P<key>["']?[A-Za-z_][A-Za-z0-9_.\-]*["']?)(?P<sep>\s*[=:]\s*)"""
    r"""(?P<value>"[^"]*"|'[^']*'|[^\s,;&}]+(?:\s+[A-Za-z0-9._~+/=-]{8,})?)"""
)
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@")


def _redact_text(text: str) -> str:
    def pair(m: re.Match[str]) -> str:
        key = m.group("key").strip("\"'")
        if key.endswith(("Error", "Exception", "Warning")):  # "NoCredentialsError: Unable to ..." is prose
            return m.group(0)
        if is_secret_key(key):
            return f"{m.group('key')}{m.group('sep')}{MASK}"
        return m.group(0)

    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    text = _PAIR.sub(pair, text)
    for pattern, _ in _VALUE_SHAPES:
        text = pattern.sub(MASK, text)
    return text


def _redact(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return MASK
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, Mapping):
        return {
            (MASK if secret_value_problem(k) else k): (MASK if is_secret_key(k) else _redact(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact(v, depth + 1) for v in value)
    return value
