"""The console script's fast path (:mod:`cluster.entry`): ``validate`` and ``status`` answered without
Typer, exactly as the Typer app answers them, and everything else handed to the Typer app."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from cluster.cli import app, prose
from cluster.entry import HOT, parse
from tests.support.runs import fake_runs

REPO = Path(__file__).resolve().parents[1]
SPEC = str(REPO / "launch" / "specs" / "imagenet_r50_100ep.json")
FAST = [sys.executable, "-c", "from cluster.entry import main; main()"]
TYPER = [sys.executable, "-m", "cluster.cli"]
ANNOTATIONS = {"readable_path": Path, "decimal": float, "str": str}
"""The fast parser's converters and the annotations of the Typer parameters they stand for."""
PATH_CHECKS = {
    "exists": False,
    "readable": True,
    "writable": False,
    "resolve_path": False,
    "allow_dash": False,
}
"""What :func:`cluster.entry.readable_path` mirrors of Typer's checks of a ``Path``."""


def _declared(param: Any) -> dict[str, Any]:
    """What the fast parser relies on, from a parameter of the Typer app."""
    kind = param.param_type_name
    if kind == "option":
        kind = "flag" if param.is_flag else "values" if param.multiple else "value"
    info = param.type_descriptor.parameter_info
    annotation = param.type_descriptor.annotation
    return {
        "name": param.name,
        "kind": kind,
        "option": "" if kind == "argument" else "/".join(param.opts + param.secondary_opts),
        "annotation": annotation.__args__[0] if kind == "values" else annotation,
        "default": param.default,
        "required": param.required,
        "plain": (info.parser, info.callback, info.min, info.max, param.envvar, param.nargs)
        == (None, None, None, None, None, 1),
    }


@pytest.mark.parametrize("command", sorted(HOT))
def test_the_fast_declaration_is_the_typer_apps(command: str) -> None:
    """One source of truth: a parameter added to or changed in cluster/cli.py and not in
    cluster.entry.HOT (or the other way round) fails here."""
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    typer_side = [_declared(p) for p in click_command.params]
    fast_side = [
        {
            "name": p.name,
            "kind": p.kind,
            "option": p.option,
            "annotation": bool if p.kind == "flag" else ANNOTATIONS[p.convert.__name__],
            "default": p.default,
            "required": p.required,
            "plain": True,
        }
        for p in HOT[command]
    ]
    assert fast_side == typer_side
    for p in click_command.params:
        info = p.type_descriptor.parameter_info
        if p.type_descriptor.annotation is Path:
            assert {k: getattr(info, k) for k in PATH_CHECKS} == PATH_CHECKS
            assert info.file_okay and info.dir_okay


def test_unusual_command_lines_go_to_typer() -> None:
    for argv in (
        [],
        ["submit", SPEC],
        ["validate"],
        ["validate", "--help"],
        ["validate", SPEC, "extra"],
        ["validate", SPEC, "--set"],
        ["validate", SPEC, "--set", "--deep"],
        ["validate", SPEC, "--deep=1"],
        ["validate", "--", SPEC],
        ["validate", "-"],
        ["status", "--interval", "x"],
        ["status", "--interval", "-1"],
        ["status", "--jso"],
        ["status", "a", "b"],
    ):
        assert parse(argv) is None, argv
    assert parse(["validate", "--set=a.b=1", SPEC, "--set", "c=2", "--deep"]) == (
        "validate",
        {"spec": Path(SPEC), "sets": ["a.b=1", "c=2"], "deep": True},
    )
    assert parse(["status", "--interval=2", "r1", "--json"]) == (
        "status",
        {"ident": "r1", "as_json": True, "watch": False, "interval": 2.0},
    )


def _both(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], ...]:
    return tuple(
        subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, env=env)
        for cmd in (FAST, TYPER)
    )


def _answer(proc: subprocess.CompletedProcess[str]) -> tuple[int, str, str]:
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "bin"  # no squeue, sacct or sbatch: the same answer every time
    path.mkdir()
    return {**os.environ, "PIXPRO_HOME": str(tmp_path / "home"), "PATH": str(path)}


def test_the_fast_path_answers_as_the_typer_app(tmp_path: Path, env: dict[str, str]) -> None:
    unreadable = tmp_path / "unreadable.json"
    unreadable.write_text("{}")
    unreadable.chmod(0)
    cases = [
        ["validate", SPEC],
        ["validate", "--set=optim.base_lr=0.5", SPEC, "--set", "seed=3"],
        ["validate", SPEC, "--set", "optim.lr=1"],
        ["validate", str(tmp_path / "missing.json")],
        ["validate", str(tmp_path)],
        ["validate", str(unreadable)],
        ["validate", "/tmp/" + "y" * 300 + ".json"],
        ["validate"],
        ["validate", ""],
        ["validate", "--help"],
        ["status"],
        ["status", ""],
        ["status", "--json"],
        ["status", "--interval", "0"],
        ["status", "--interval=nan", "--watch"],
        ["status", "bad/id"],
        ["status", "nosuchrun", "--json"],
        ["status", "--interval", "x"],
        ["status", "--help"],
    ]
    for args in cases:
        fast, slow = _both(args, env)
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr), (
            args
        )
        assert "Traceback" not in fast.stderr, args


def _shape(table: str) -> str:
    """The table less its ages (``5s``, ``2m07s``) and the widths they give their column."""
    return re.sub(r"([━─ ])\1+", r"\1", re.sub(r"\b\d+[smhd](\d\d[smh])?\b", "AGE", table))


def _steady(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows less what moves between two calls (ages, the time left)."""
    return [{k: v for k, v in r.items() if not k.endswith(("age_s", "eta_s"))} for r in rows]


def test_status_of_runs_answers_as_the_typer_app(tmp_path: Path, env: dict[str, str]) -> None:
    fake_runs(tmp_path / "home", 8)
    fast, slow = _both(["status", "--json"], env)
    assert (fast.returncode, fast.stderr) == (slow.returncode, slow.stderr) == (0, slow.stderr)
    assert _steady(json.loads(fast.stdout)) == _steady(json.loads(slow.stdout))
    assert len(json.loads(fast.stdout)) == 8
    fast, slow = _both(["status", "r01-20260101-000000-0001"], env)
    assert (fast.returncode, _shape(fast.stdout), fast.stderr) == (0, _shape(slow.stdout), slow.stderr)
    assert "r01-20260101-000000-0001" in fast.stdout


PROBE = (
    "import sys\n"
    "LOADED = ('typer', 'rich', 'pydantic', 'importlib.metadata')\n"
    "from cluster.entry import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "print(code, *sorted(m for m in LOADED if m in sys.modules), file=sys.stderr)\n"
)


@pytest.mark.parametrize(
    ("args", "runs", "loaded"),
    [
        (["validate", SPEC], 0, "0 pydantic"),  # the spec models; no Typer, no rich, no plugin loader
        (["status"], 4, "0 rich"),  # the table; no Typer, no pydantic (no heartbeat, no node failure)
        (["status", "--json"], 4, "0"),
        (["status", "--json"], 0, "0"),
    ],
)
def test_the_hot_commands_import_no_typer(
    env: dict[str, str], args: list[str], runs: int, loaded: str
) -> None:
    fake_runs(Path(env["PIXPRO_HOME"]), runs)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.stderr.splitlines()[-1] == loaded, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "--version"], capture_output=True, text=True, timeout=120, env=env
    )
    assert "typer" in proc.stderr.splitlines()[-1].split(), proc.stderr  # every other command: the app


STAND_IN_PROBE = """
import os, sys
from cluster.entry import PLUGIN_LOADER, skip_plugin_loader
skip_plugin_loader()
stood_in = PLUGIN_LOADER in sys.modules
from pydantic import BaseModel
class Model(BaseModel):
    x: int
assert Model(x=1).x == 1
scanned = 'importlib.metadata' in sys.modules
from pydantic.plugin._loader import PYDANTIC_ENTRY_POINT_GROUP  # not the stand-in's: the real module's
print(stood_in, scanned, PYDANTIC_ENTRY_POINT_GROUP, 'importlib.metadata' in sys.modules)
"""


@pytest.mark.parametrize(
    ("plugins", "said"),
    [
        ("1", "True False pydantic True"),  # no plugin: the stand-in; the real module when asked
        ("true", "True False pydantic True"),
        ("__all__", "True False pydantic True"),
        ("some_plugin,other", "False True pydantic True"),  # others load: pydantic's own loader
        (None, "False True pydantic True"),
    ],
)
def test_the_plugin_loader_stands_in_only_while_every_plugin_is_off(plugins: str | None, said: str) -> None:
    """``validate`` skips pydantic's plugin loader (its ``importlib.metadata``, a tenth of the command)
    only when pydantic would load no plugin, and any other name of the loader is the real module's."""
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    if plugins is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = plugins
    proc = subprocess.run(
        [sys.executable, "-c", STAND_IN_PROBE], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0 and proc.stdout.split() == said.split(), proc.stderr


@pytest.mark.parametrize("plugins", ["1", "true", "__all__"])
def test_pydantic_loads_no_plugin_where_the_stand_in_answers_none(plugins: str) -> None:
    """The stand-in's answer is pydantic's own for every value it stands in for (pydantic is pinned in
    requirements.lock; this fails first if a new release reads the variable otherwise)."""
    from cluster.entry import LOADER_STAND_IN, PLUGINS_OFF

    script = "from pydantic.plugin._loader import get_plugins; print(list(get_plugins()))"
    env = {**os.environ, "PYDANTIC_DISABLE_PLUGINS": plugins}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert plugins in PLUGINS_OFF and proc.stdout.strip() == "[]", proc.stderr
    assert list(LOADER_STAND_IN.get_plugins()) == []


def test_the_status_table_prints_cells_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A swept value with brackets (a path such as ``/data/[red]x``) is data, not rich markup."""
    from cluster import hot
    from cluster.index import Index
    from tests.support.runs import fake_run

    home = tmp_path / "home"
    monkeypatch.setenv("PIXPRO_HOME", str(home))
    rec = fake_run(home, 1)
    rec.sweep_id, rec.sweep_values = "s1", {"data.root": "/data/[red]x[/red] :smile:"}
    Index(home).put(rec)
    hot.status(None, as_json=False, watch=False, interval=5.0)
    assert '"/data/[red]x[/red] :smile:"' in capsys.readouterr().out


def test_every_commands_help_is_prose_for_the_terminal_to_wrap() -> None:
    """Typer keeps a docstring's line breaks, so a paragraph of ``pixpro --help`` or ``pixpro eval --help``
    would break mid-sentence where the source wraps: each paragraph is one line, for the terminal to wrap."""
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert {"resume", "eval", "pack"} <= set(commands)  # the ones whose docstrings wrap
    for name, command in commands.items():
        paragraphs = (command.help or "").split("\n\n")
        assert paragraphs[0] and all("\n" not in p and "  " not in p for p in paragraphs), name
    assert (
        prose("\n  One\n  two.\n\n  \bkeep\n  as is\n\n  Three\f\n  not shown")
        == "One two.\n\n\bkeep\nas is\n\nThree"
    )


@pytest.mark.parametrize("name", ["", *typer.main.get_command(app).commands])  # type: ignore[attr-defined]
def test_help_gives_no_type_for_a_flag(name: str, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """Typer 0.29 prints a flag as ``--json <bool>``, which reads as if it took a value: the type column
    stays empty for a flag (``--help`` included) and names the type of an option that takes one."""
    monkeypatch.setattr(sys, "argv", ["pixpro", *filter(None, [name]), "--help"])
    with pytest.raises(SystemExit) as exited:
        app()
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--help " in out and "<bool>" not in out, name
    if name == "status":
        assert re.search(r"--json +JSON: a list of runs", out) and re.search(r"--interval +<float>", out)


def test_options_that_cannot_apply_are_refused_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """``status --json --watch`` (the JSON was printed once, --watch ignored), ``logs --rank`` beyond
    the run's ranks (printed nothing, exit 0) and a ``PIXPRO_HOME`` that is a file ("No runs yet")."""
    (rec,) = fake_runs(tmp_path / "home", 1)
    home_file = tmp_path / "file"
    home_file.write_text("")
    for home, args, said in (
        (tmp_path / "home", ["status", "--json", "--watch"], "--json and --watch"),
        (
            tmp_path / "home",
            ["logs", rec.run_id, "--rank", "1"],
            f"--rank 1: run {rec.run_id} has ranks 0 to 0",
        ),
        (home_file, ["status"], f"PIXPRO_HOME {home_file} is a file"),
    ):
        monkeypatch.setenv("PIXPRO_HOME", str(home))
        monkeypatch.setattr(sys, "argv", ["pixpro", *args])
        with pytest.raises(SystemExit) as exited:
            app()
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1 and said in err, (args, err)
