"""Validated run specs for pixpro, importable without torch (the CLI checks specs on login nodes).

The public names are those of :mod:`schemas.run_spec` (its ``__all__``), re-exported here.
"""

from schemas.run_spec import *  # noqa: F403
from schemas.run_spec import __all__ as __all__
