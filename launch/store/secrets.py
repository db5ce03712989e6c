"""Credentials the store must never write or echo: collected from storage options, the URL's user-info
and the AWS environment, redacted from every exception message that leaves a store call, and refused in
manifests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from launch.store.backends import exc_chain
from launch.store.format import StoreError, one_line
from schemas.secrets import MASK, is_secret_key, normalize_key, redact, secret_value_problem

# The one policy (schemas.secrets) decides what a credential key or value is, for the spec and here;
# user names are redacted from store messages too (they identify an account).
_CRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_MIN_SECRET_LEN = 4


def split_url(url: str) -> tuple[str, str, tuple[str, str] | None, str]:
    """(protocol, path without protocol, userinfo, display URL with userinfo redacted)."""
    if "://" not in url:
        return "", url, None, url
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo = None
    if "@" in netloc:
        info, netloc = netloc.rsplit("@", 1)
        user, _, password = info.partition(":")
        userinfo = (user, password)
    path = netloc + parts.path
    display = f"{parts.scheme}://{'***@' if userinfo else ''}{path}"
    return parts.scheme.lower(), path, userinfo, display


def collect_secrets(options: dict[str, Any], userinfo: tuple[str, str] | None) -> frozenset[str]:
    found: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, (dict, list, tuple)):
                    walk(v)
                elif isinstance(v, str) and (
                    is_secret_key(k) or normalize_key(str(k)) == "username" or secret_value_problem(v)
                ):
                    found.add(v)

    walk(options)
    found.update(userinfo or ())
    found.update(os.environ.get(k, "") for k in _CRED_ENV)
    return frozenset(s for s in found if len(s) >= _MIN_SECRET_LEN)


class Redactor:
    """The credential values of one store, and the guards that keep them out of messages and files."""

    def __init__(self, secrets: frozenset[str]) -> None:
        self.secrets = secrets

    def redact(self, text: str) -> str:
        """The configured values, then whatever has a credential's shape (key ids, URL user-info)."""
        for s in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(s, MASK)
        return redact(text)

    def leaks(self, e: BaseException) -> bool:
        return any(s in f"{x!s} {x.args!r}" for x in exc_chain(e) for s in self.secrets)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Re-raise an exception whose text (or cause's) contains a credential as a redacted StoreError."""
        try:
            yield
        except Exception as e:
            if self.secrets and self.leaks(e):
                raise StoreError(self.redact(one_line(f"{type(e).__name__}: {e}", 500))) from None
            raise

    @staticmethod
    def check_meta(meta: dict[str, Any]) -> None:
        def walk(obj: Any, path: str) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if is_secret_key(k):
                        raise ValueError(f"meta key {path}{k} looks like a credential; refusing to store it")
                    walk(v, f"{path}{k}.")
            elif isinstance(obj, str) and secret_value_problem(obj):
                raise ValueError(
                    f"meta value at {path.rstrip('.')} looks like a credential; refusing to store it"
                )
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    walk(v, path)

        if not isinstance(meta, dict):
            raise TypeError("meta must be a dict")
        walk(meta, "")

    def check_no_secrets(self, body: bytes) -> None:
        text = body.decode()
        if any(s in text for s in self.secrets):
            raise ValueError("refusing to commit: the manifest would contain a configured credential")
