"""NCCL's device rule for CPU test runs: put this folder first on PYTHONPATH and every process builds
its default process group as ``"cuda:gloo"``, whatever backend the code asks for.

Such a group refuses a CPU tensor exactly as NCCL does (``No backend type associated with device type
cpu``), so a CPU run under this rule fails wherever the GPU job would: a control-plane collective on the
default group, a barrier, a broadcast of Python objects. gloo alone accepts them all, which is how a
multi-GPU job could crash at its first step while every CPU test passed.

Applied when ``torch.distributed`` is first imported (not here: this file runs in every Python process
of the test, most of which never import torch); each patched process says so once on stderr
(:data:`MARKER`), so a test can tell that the rule was on.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

MARKER = "nccl-rule: default process group built as cuda:gloo"


def _patch(dist: ModuleType) -> None:
    original = dist.init_process_group

    def init_process_group(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        print(f"{MARKER} (asked for {backend!r})", file=sys.stderr, flush=True)
        return original("cuda:gloo", *args, **kwargs)

    dist.init_process_group = init_process_group  # type: ignore[attr-defined]


class _OnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "torch.distributed":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        exec_module = loader.exec_module

        def run(module: ModuleType) -> None:
            exec_module(module)
            _patch(module)

        loader.exec_module = run
        return spec


sys.meta_path.insert(0, _OnImport())
