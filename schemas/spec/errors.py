""":class:`SpecError`, and pydantic's validation errors rendered as one line each:
``field.path: message (got value)``, shortened, with a suggestion for a misspelt key and never a value
that may hold a secret."""

from __future__ import annotations

import re
import reprlib
import types
from difflib import get_close_matches
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from schemas.contract import one_line
from schemas.secrets import is_secret_key, secret_paths
from schemas.spec.constants import MAX_KEY_SHOWN
from schemas.spec.run import RunSpec


class SpecError(ValueError):
    """An invalid spec; ``str()`` is one line per problem, ``problems`` the same as a list."""

    def __init__(self, problems: list[str] | str) -> None:
        if isinstance(problems, str):
            problems = problems.splitlines()
        cleaned = [one_line(p) for p in problems]  # a problem is exactly one short line
        self.problems: list[str] = [p for p in dict.fromkeys(cleaned) if p] or ["invalid spec"]
        super().__init__("\n".join(self.problems))


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 5
_REPR.maxlevel = 3
_MAX_GOT = 80
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_NO_GOT = frozenset({"missing", "credentials", "union_tag_not_found"})


def _short_repr(value: Any) -> str:
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__ must not hide the real problem
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= _MAX_GOT else text[: _MAX_GOT - 3] + "..."


def _node_for(annotation: Any) -> Any:
    """Model class, a {tag: model} dict for a discriminated union, or None for plain values."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _node_for(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _node_for(args[0])
        nodes = [_node_for(a) for a in args]
        if all(isinstance(n, type) and issubclass(n, BaseModel) and "kind" in n.model_fields for n in nodes):
            return {n.model_fields["kind"].default: n for n in nodes}
        return None
    if origin is list:
        return _node_for(get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _fmt_key(key: Any, first: bool) -> str:
    if isinstance(key, str) and len(key) > MAX_KEY_SHOWN:
        return f"[{key[: MAX_KEY_SHOWN - 10]!r}...]"  # a megabyte-long key is not echoed whole
    if isinstance(key, str) and _KEY_RE.fullmatch(key):
        return key if first else f".{key}"
    return f"[{_short_repr(key)}]"


def _contains_credentials(value: Any) -> bool:
    """Whether an error's input may hold a secret (the one policy of :mod:`schemas.secrets`)."""
    return bool(secret_paths(value))


def _render_loc(loc: tuple[Any, ...]) -> tuple[str, Any, bool]:
    """Dotted path of an error location, the model that holds its last key, and whether the error is
    about a dict key itself. Discriminator tags that pydantic inserts are dropped."""
    node: Any = RunSpec
    parent: Any = None
    text = ""
    is_key = False
    for i, seg in enumerate(loc):
        if seg == "[key]" and i == len(loc) - 1:
            is_key = True
            break
        if isinstance(node, dict) and seg in node:
            node = node[seg]  # discriminator tag, not a key of the input
            continue
        parent = node
        if isinstance(seg, int) and not isinstance(node, type):
            text += f"[{seg}]"
            continue
        text += _fmt_key(seg, not text)
        if isinstance(node, type) and issubclass(node, BaseModel) and seg in node.model_fields:
            node = _node_for(node.model_fields[seg].annotation)
        else:
            node = None
    return text or "spec", parent, is_key


def _suggest(key: str, allowed: list[str]) -> str | None:
    """The field a misspelt key most likely meant: a near spelling, or a field that has the key as a
    word (``lr`` -> ``base_lr``)."""
    close = get_close_matches(key, allowed, n=1)
    if close:
        return close[0]
    words = [f for f in allowed if key.lower() in f.split("_")]
    return words[0] if len(words) == 1 else None


def _error_line(err: ErrorDetails | dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    path, parent, is_key = _render_loc(loc)
    kind = err.get("type", "")
    message = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        message = "unknown key"
        if isinstance(parent, type) and issubclass(parent, BaseModel) and loc:
            allowed = list(parent.model_fields)
            close = _suggest(str(loc[-1]), allowed)
            message += f"; did you mean {close!r}?" if close else f" (allowed: {', '.join(allowed)})"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "expected an object (mapping)"
    elif kind == "union_tag_not_found":
        message = "missing 'kind' (one of: rotation, affine, perspective, elastic)"
    if is_key:
        message = f"invalid key: {message}"
    secret = kind in _NO_GOT or any(is_secret_key(s) for s in loc)
    value = err.get("input")
    if secret or _contains_credentials(value):
        return f"{path}: {message}"
    return f"{path}: {message} (got {_short_repr(value)})"


def validation_problems(exc: ValidationError) -> list[str]:
    return [_error_line(e) for e in exc.errors(include_url=False)]
