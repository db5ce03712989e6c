"""The ``pixpro`` console script: ``validate`` and ``status``, the commands typed most, are parsed here
and answered without importing Typer or building its command tree (about 0.05 s of every call on a
login node); every other command line (``--help``, other commands, anything this parser does not take
exactly as Typer would, errors included) goes to the Typer app in :mod:`cluster.cli` unchanged.

:data:`HOT` declares the two commands' parameters once for this parser; tests/test_cli_entry.py checks
it against the Typer declarations, so the two cannot drift apart.
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def readable_path(value: str) -> Path:
    """Typer's ``Path`` argument (``readable=True``): a path that exists but cannot be read is Typer's
    usage error, left to the Typer app (ValueError)."""
    if os.path.exists(value) and not os.access(value, os.R_OK):
        raise ValueError(value)
    return Path(value)


_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def decimal(value: str) -> float:
    """A plain decimal number; anything else (``nan``, ``1e3``, spaces...) is left to Typer's own
    reading of a float (ValueError)."""
    if not _DECIMAL.fullmatch(value):
        raise ValueError(value)
    return float(value)


@dataclass(frozen=True)
class Param:
    """One parameter of a hot command, as the Typer declaration in :mod:`cluster.cli` has it."""

    name: str
    """The keyword of the function in :mod:`cluster.hot` (and of the Typer command)."""
    kind: str
    """``argument``, ``flag``, ``value`` or ``values`` (a repeatable option)."""
    option: str = ""
    convert: Callable[[str], Any] = str
    default: Any = None
    required: bool = False


HOT: dict[str, tuple[Param, ...]] = {
    "validate": (
        Param("spec", "argument", convert=readable_path, required=True),
        Param("sets", "values", "--set"),
        Param("deep", "flag", "--deep", default=False),
    ),
    "status": (
        Param("ident", "argument"),
        Param("as_json", "flag", "--json", default=False),
        Param("watch", "flag", "--watch", default=False),
        Param("interval", "value", "--interval", decimal, default=5.0),
    ),
}

NO_PYDANTIC_PLUGINS = "PYDANTIC_DISABLE_PLUGINS"
"""Set (unless the user set it) while a hot command that starts no Python process runs: the spec and
record models are ours and need no plugin."""
PLUGINS_OFF = ("__all__", "1", "true")
"""The values of :data:`NO_PYDANTIC_PLUGINS` with which pydantic loads no plugin at all."""
PLUGIN_LOADER = "pydantic.plugin._loader"


def _no_plugins() -> tuple[()]:
    return ()


def _real_loader(name: str) -> Any:
    """Any other name of the loader: the real module replaces the stand-in and answers. A module's own
    dunders (the import system asks for ``__path__``) it has not, as the real one has not."""
    if name.startswith("__"):
        raise AttributeError(name)
    if sys.modules.get(PLUGIN_LOADER) is LOADER_STAND_IN:
        del sys.modules[PLUGIN_LOADER]
    return getattr(importlib.import_module(PLUGIN_LOADER), name)


LOADER_STAND_IN = types.ModuleType(PLUGIN_LOADER, "pixpro's stand-in while pydantic plugins are off")
LOADER_STAND_IN.__dict__.update(get_plugins=_no_plugins, __getattr__=_real_loader)


def skip_plugin_loader() -> None:
    """With every plugin off, pydantic's plugin loader still imports ``importlib.metadata`` (and with it
    ``email``, ``zipfile``, ``csv``: ~0.015 s, a tenth of ``validate``) only to return no plugin. Its
    stand-in returns none at once; any other name it is asked for loads the real module."""
    if os.environ.get(NO_PYDANTIC_PLUGINS) in PLUGINS_OFF:
        sys.modules.setdefault(PLUGIN_LOADER, LOADER_STAND_IN)


def parse(argv: list[str]) -> tuple[str, dict[str, Any]] | None:
    """The hot command and its keywords, or None: the Typer app answers (help, errors, ``--``, a dash
    value, a value Typer would refuse...)."""
    if not argv or argv[0] not in HOT:
        return None
    params = HOT[argv[0]]
    options = {p.option: p for p in params if p.option}
    kwargs: dict[str, Any] = {p.name: p.default for p in params}
    positional: list[str] = []
    tokens = iter(argv[1:])
    for token in tokens:
        if not token.startswith("-"):
            positional.append(token)
            continue
        name, eq, inline = token.partition("=")
        param = options.get(name)
        if param is None or (param.kind == "flag" and eq):
            return None
        if param.kind == "flag":
            kwargs[param.name] = True
            continue
        value = inline if eq else next(tokens, None)
        if value is None or (not eq and value.startswith("-")):
            return None
        try:
            converted = param.convert(value)
        except ValueError:
            return None
        kwargs[param.name] = [*(kwargs[param.name] or ()), converted] if param.kind == "values" else converted
    arguments = [p for p in params if p.kind == "argument"]
    if len(positional) > len(arguments) or len(positional) < sum(p.required for p in arguments):
        return None
    for param, token in zip(arguments, positional, strict=False):
        try:
            kwargs[param.name] = param.convert(token)
        except ValueError:
            return None
    return argv[0], kwargs


def main() -> None:
    """The console script: exit statuses and error lines as the Typer app's."""
    call = parse(sys.argv[1:])
    if call is None:
        from cluster.cli import app

        app()
        return
    name, kwargs = call
    if not kwargs.get("deep"):  # the scan of every installed package for pydantic plugins (~0.015 s);
        os.environ.setdefault(NO_PYDANTIC_PLUGINS, "1")  # never set for a Python child (--deep)
        skip_plugin_loader()
    try:
        from cluster import hot

        getattr(hot, name)(**kwargs)
    except (KeyboardInterrupt, Exception) as exc:
        from cluster.exits import exit_status

        code = exit_status(exc)
        if code is not None:
            sys.exit(code)
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:  # as Click: a closed pipe ends quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        raise
    sys.exit(0)
