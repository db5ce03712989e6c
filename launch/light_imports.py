"""torchvision without ``torch._dynamo``, for a process that neither compiles nor steps an optimizer.

Importing torchvision imports ``torch._dynamo`` twice over: ``torchvision.ops.roi_align`` for one
function it calls only on a fallback path, and ``torchvision.tv_tensors`` (transforms v2) through
``@torch.compiler.disable`` on one function. ``torch._dynamo`` brings sympy and the compiler stack: 1.3 s
of the preflight's 4.7 s (``benches/bench_startup.py``). A trainer pays it anyway (its optimizer imports
``torch._dynamo``); a preflight need not. :func:`import_torchvision` imports torchvision against a
stand-in for those two modules and takes the stand-in away again, so a later ``import torch._dynamo``
(or ``torch._dynamo`` attribute access) imports the real one, and roi_align's function imports it on its
first call. What the stand-in changes: the one tv_tensors function is not excluded from compilation,
which matters only to a process that compiles; such a process must not call this.
"""

from __future__ import annotations

import sys
import types
from typing import Any

_STANDS_IN = ("torch._dynamo", "torch._dynamo.utils")


def _is_compile_supported(device_type: str) -> Any:
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


def _disable(fn: Any = None, recursive: bool = True, *, reason: str | None = None) -> Any:
    return fn if fn is not None else (lambda f: f)


def import_torchvision() -> None:
    """Import torchvision and its transforms v2; ``torch._dynamo`` only where something already did."""
    if "torchvision" in sys.modules or "torch._dynamo" in sys.modules:
        return
    import torch  # noqa: F401  (the real package: the stand-ins are its submodules)

    package = types.ModuleType("torch._dynamo")
    package.__path__ = []  # a package, so that its submodule resolves
    package.disable = _disable  # type: ignore[attr-defined]  # torch.compiler.disable calls it
    utils = types.ModuleType("torch._dynamo.utils")
    utils.is_compile_supported = _is_compile_supported  # type: ignore[attr-defined]
    sys.modules.update(zip(_STANDS_IN, (package, utils), strict=True))
    try:
        import torchvision.transforms.v2  # noqa: F401
    finally:
        for name in _STANDS_IN:
            del sys.modules[name]
