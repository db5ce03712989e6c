"""Validated run specs for pixpro, importable without torch (the CLI checks specs on login nodes).

The public names are those of :mod:`schemas.run_spec` (its ``__all__``), re-exported here on first use:
importing :mod:`schemas.contract` (``pixpro status``) must not pay for building every spec model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.run_spec import *  # noqa: F403
    from schemas.run_spec import __all__ as __all__


def __getattr__(name: str) -> Any:
    run_spec = importlib.import_module("schemas.run_spec")
    if name == "__all__" or name in run_spec.__all__:
        return getattr(run_spec, name)
    raise AttributeError(f"module 'schemas' has no attribute {name!r}")
