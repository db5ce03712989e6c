"""Patch a module the moment it is first imported: for ``sitecustomize`` files that change or observe
``torch.distributed`` in every process of a test or check, without importing torch in the processes that
never use it."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


def after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run ``patch(module)`` right after module ``name`` executes, before its importer sees it."""

    class OnImport(importlib.abc.MetaPathFinder):
        def find_spec(
            self, fullname: str, path: Any, target: Any = None
        ) -> importlib.machinery.ModuleSpec | None:
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None:
                return spec
            loader: Any = spec.loader
            exec_module = loader.exec_module

            def run(module: ModuleType) -> None:
                exec_module(module)
                patch(module)

            loader.exec_module = run
            return spec

    sys.meta_path.insert(0, OnImport())
