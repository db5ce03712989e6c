"""Every name that crosses the login/compute boundary is spelled once, in :mod:`schemas.contract`.

The run folder's and the store's file names, the exit markers, the ``PIXPRO_*`` environment variables,
the error-line length and the exit statuses of the process tree: a string or number literal of one of
them anywhere else in pixpro/, launch/, cluster/ or schemas/ is a second source that can drift. String
literals are found with :mod:`ast` (exact values, so help text and docstrings that mention a name in a
sentence do not count; f-string parts do).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from schemas import contract as c

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pixpro", "launch", "cluster", "schemas")
CONTRACT = Path("schemas/contract.py")

NAMES = {
    c.SPEC_FILE, c.RECORD_FILE, c.SBATCH_FILE, c.SUBMITIT_DIR, c.LOGS_DIR, c.CHECKPOINTS_DIR,
    c.TENSORBOARD_DIR, c.HEARTBEATS_DIR, c.MANIFEST, c.STATUS_FILE, c.TRAIN_FILE, c.METRICS_DIR,
    c.LATEST, c.exit_marker("preempted", ""), c.exit_marker("diverged", ""),
}  # fmt: skip
"""Not here: ``LOCAL_DIR`` ("local", also the executor's and fsspec's name of the local file system)
and ``CANCEL_MARKER`` ("CANCELLED", also a SLURM job state): their literals mean those other things."""
ENV = re.compile(r"\s*(PIXPRO_[A-Z0-9_]+)=?\s*")
ALLOWED = {
    (Path("pixpro/sources.py"), "manifest.json"): "a data pack's own manifest (pixpro.sources owns it)",
    (Path("launch/sinks.py"), "tensorboard"): "the sink's name, the spec's logging.tensorboard switch",
    (Path("pixpro/sources.py"), c.MAX_LINE): "a read error's cause, cut where pixpro (no schemas) raises it",
    (Path("cluster/hot.py"), c.MAX_LINE): "the status table's width when stdout is not a terminal",
}
PROCESS_TREE = ("launch/run.py", "launch/train.py", "cluster/node_task.py", "cluster/local.py")
"""Modules whose exit statuses travel from a trainer rank up to sbatch: :class:`schemas.contract.Exit`."""
STATUS_NAMES = frozenset({"rc", "code", "status"})


def sources() -> Iterator[tuple[Path, ast.AST]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel != CONTRACT:
                yield rel, ast.parse(path.read_text(encoding="utf-8"), str(rel))


def literals(tree: ast.AST) -> Iterator[tuple[int, str | int]]:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (str, int))
            and not isinstance(node.value, bool)
        ):
            yield node.lineno, node.value


def contract_literals() -> list[tuple[Path, int, str | int]]:
    found = []
    for rel, tree in sources():
        for line, value in literals(tree):
            if isinstance(value, str):
                env = ENV.fullmatch(value)
                hit = value in NAMES or env is not None
                value = env.group(1) if env else value
            else:
                hit = value == c.MAX_LINE
            if hit:
                found.append((rel, line, value))
    return found


def test_no_contract_name_is_spelled_outside_the_contract() -> None:
    found = contract_literals()
    stray = [f"{rel}:{line}: {value!r}" for rel, line, value in found if (rel, value) not in ALLOWED]
    assert stray == [], "use schemas.contract (RunPaths, the *_ENV names, exit_marker, MAX_LINE/one_line)"


def test_every_exception_is_still_needed() -> None:
    """An exception whose literal is gone would silently allow the next one."""
    seen = {(rel, value) for rel, _, value in contract_literals()}
    assert set(ALLOWED) <= seen, set(ALLOWED) - seen


def test_the_environment_variables_are_the_contracts() -> None:
    """The pattern the scan uses matches every ``PIXPRO_*`` variable the contract names."""
    names = {v for k, v in vars(c).items() if k.endswith("_ENV") and isinstance(v, str)}
    assert len(names) >= 10 and all(ENV.fullmatch(n) for n in names), names
    assert ENV.fullmatch(" PIXPRO_SIGNAL=") and not ENV.fullmatch("runs are kept in $PIXPRO_HOME")


def _int_statuses(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Exit statuses written as bare numbers: returned, passed to an exit, assigned to or compared
    with a status variable, or its fallback (``rc or 1``)."""

    def number(node: ast.AST | None) -> bool:
        return isinstance(node, ast.Constant) and type(node.value) is int

    def numbers(node: ast.AST) -> bool:
        return number(node) or (isinstance(node, ast.Tuple) and any(number(e) for e in node.elts))

    def status(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id in STATUS_NAMES

    for node in ast.walk(tree):
        compare = (
            isinstance(node, ast.Compare) and status(node.left) and any(numbers(x) for x in node.comparators)
        )
        fallback = isinstance(node, ast.BoolOp) and status(node.values[0]) and any(map(number, node.values))
        bad = (
            (isinstance(node, ast.Return) and number(node.value))
            or (
                isinstance(node, ast.Call)
                and ast.unparse(node.func) in ("sys.exit", "os._exit", "SystemExit")
                and any(number(a) for a in node.args)
            )
            or (isinstance(node, ast.Assign) and any(status(t) for t in node.targets) and number(node.value))
            or (isinstance(node, ast.AnnAssign) and status(node.target) and number(node.value))
            or compare
            or fallback
        )
        if bad:
            yield getattr(node, "lineno", 0), ast.unparse(node).splitlines()[0]
        if isinstance(node, ast.arguments):  # a status parameter's default
            params = [*node.posonlyargs, *node.args][
                len(node.posonlyargs) + len(node.args) - len(node.defaults) :
            ]
            pairs = [
                *zip(params, node.defaults, strict=True),
                *zip(node.kwonlyargs, node.kw_defaults, strict=True),
            ]
            for arg, default in pairs:
                if arg.arg in STATUS_NAMES and default is not None and number(default):
                    yield default.lineno, f"{arg.arg}={ast.unparse(default)}"


def test_the_process_tree_exits_with_the_contracts_statuses() -> None:
    found = []
    for name in PROCESS_TREE:
        tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
        found += [f"{name}:{line}: {text}" for line, text in _int_statuses(tree)]
    assert found == [], "use schemas.contract.Exit"


def test_bare_statuses_are_found() -> None:
    source = (
        "def main(status: int = 1):\n    rc = 2\n    if rc in (0, 75):\n        return 2\n"
        "    sys.exit(0)\n    return rc or 1\n"
    )
    assert sorted(line for line, _ in _int_statuses(ast.parse(source))) == [1, 2, 3, 4, 5, 6]
