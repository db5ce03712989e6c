"""Imports run one way, checked on every module's source (not only what a command loads at run time).

``schemas/`` imports nothing of ours but itself and no torch, at any level (a lazy import counts: it
runs on some path); ``pixpro/`` imports nothing of ``launch/`` or ``cluster/``; ``launch/`` nothing of
``cluster/``; ``cluster/`` no torch, no ``pixpro`` and of ``launch/`` only the torch-free store, which
itself imports no torch and nothing of ``pixpro``/``cluster``. The runtime checks (``pixpro status``
and ``validate`` load no torch) live in tests/test_cli.py and tests/test_schemas_export.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = ("torch", "torchvision")
STORE = "launch.store"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """Every module the file imports, at any level (functions, ``TYPE_CHECKING`` blocks, relative
    imports resolved, ``importlib.import_module("...")`` with a literal name), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.append((module, node.lineno))
            if node.module is None:  # from . import x: x may be a module
                out += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.args[0].value, node.lineno))
    return out


def forbidden(module: str, name: str) -> str | None:
    """Why ``module`` may not import ``name`` (None: allowed)."""
    if _within(module, STORE) or _within(module, "cluster"):
        if any(_within(name, t) for t in TORCH):
            return "the login side and the store never import torch"
        if _within(name, "pixpro"):
            return "the login side and the store know nothing of the algorithm"
        if _within(name, "launch") and not _within(name, STORE):
            return "the login side uses only the torch-free store of launch/"
    if _within(module, "schemas"):
        if any(_within(name, t) for t in TORCH):
            return "schemas/ never imports torch"
        if any(_within(name, p) for p in ("pixpro", "launch", "cluster")):
            return "schemas/ imports nothing of ours but itself"
    if _within(module, "pixpro") and any(_within(name, p) for p in ("launch", "cluster")):
        return "pixpro/ knows nothing of launching or clusters"
    if _within(module, "launch") and _within(name, "cluster"):
        return "launch/ never imports the login side"
    return None


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for package in ("schemas", "pixpro", "launch", "cluster"):
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            for name, line in imported(path, root):
                why = forbidden(module, name)
                if why:
                    out.append(f"{path.relative_to(root)}:{line}: imports {name}: {why}")
    return out


def test_every_module_keeps_the_import_rules() -> None:
    assert violations() == []


def test_the_launch_package_itself_imports_nothing() -> None:
    """``import launch.store`` runs ``launch/__init__.py`` first: the login side pays for what it imports."""
    assert imported(ROOT / "launch" / "__init__.py") == []


def test_the_scan_sees_lazy_relative_and_dynamic_imports(tmp_path: Path) -> None:
    """A rule checker that sees nothing passes everything: each import form is found and judged."""
    for package in ("schemas", "cluster", "launch", "pixpro"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "schemas" / "gen.py").write_text("def f():\n    import torch\n    from .x import y\n")
    (tmp_path / "cluster" / "cli.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from launch.train import Trainer\n"
        "import importlib\nimportlib.import_module('pixpro.model')\n"
        "from launch.store.format import one_line\n"
    )
    (tmp_path / "pixpro" / "model.py").write_text("from cluster import runs\n")
    found = violations(tmp_path)
    assert sorted(v.split(": ", 1)[0] for v in found) == [
        "cluster/cli.py:3", "cluster/cli.py:5", "pixpro/model.py:1", "schemas/gen.py:2",
    ], found  # fmt: skip
    assert ("schemas.x", 3) in imported(tmp_path / "schemas" / "gen.py", tmp_path)


@pytest.mark.parametrize(
    ("module", "name", "allowed"),
    [
        ("cluster.progress", "launch.store", True),
        ("cluster.runs", "launch.store.format", True),
        ("cluster.runs", "launch.storefront", False),
        ("cluster.status", "torch.distributed", False),
        ("launch.store.s3", "pixpro.sources", False),
        ("launch.train", "pixpro.model", True),
        ("schemas.spec.errors", "schemas.contract", True),
        ("schemas.backbones", "pixpro.model", False),
        ("pixpro.model", "schemas.contract", True),
    ],
)
def test_rules(module: str, name: str, allowed: bool) -> None:
    assert (forbidden(module, name) is None) == allowed
