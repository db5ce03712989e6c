"""``pixpro status`` on an ordinary terminal: the table fits 80 and 120 columns by dropping its less
important columns first and letting a state's detail wrap; RUN, STATE and STEP are never shrunk or cut,
and no number (LR, a step) is cut mid-number (rich's own squeezing printed ``ST…``, ``COMPL…``,
``0.00…``)."""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.live import Live
from rich.text import Text

from cluster import render
from cluster.status import collect
from tests.support.runs import fake_runs

CORE = ["RUN", "STATE", "STEP"]
NEXT = ["CKPT AGE", "LR", "EMA", "ETA"]  # kept at 80 columns for runs like these
EVERY = ["RUN", "ATTEMPTS", "STATE", "NODES×GPUS", "STEP", "EPOCH", "CKPT", "CKPT AGE", "COMMIT", "LR",
         "EMA", "IMG/S", "KNN@1", "ETA"]  # fmt: skip
# the run table's columns, the last to go first on a narrower terminal
PRIORITY = [*CORE, *NEXT, "KNN@1", "ATTEMPTS", "IMG/S", "NODES×GPUS", "EPOCH", "CKPT", "COMMIT"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Ten runs as ``pixpro status`` reads them from disk (completed, preempted, failed, unknown to
    SLURM), two of them made running (one stalled) and one pending, as SLURM would say."""
    found, _ = collect(fake_runs(tmp_path_factory.mktemp("width") / "home", 10))
    found[4].update(state="RUNNING", reason="restart 2", eta_s=50000.0, knn_top1=0.412, knn_step=8)
    found[8].update(state="PENDING", reason="Priority", expected_start=time.time() + 3600)
    found[7].update(state="STALLED", reason="no progress for 612 s, hang timeout 600 s", lr=0.000123)
    return found


@pytest.fixture(scope="module")
def big(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same runs with a long spec name, a 125k-step schedule and small learning rates."""
    out = []
    for i, r in enumerate(rows):
        out.append(
            r
            | {"run_id": f"imagenet_r50_100ep-20261207-1015{i:02d}-3fa{i}", "step": 61234 + i}
            | {"total_steps": 125100, "lr": 0.000123 * (i + 1), "commit_s": 12.3}
        )
    return out


def draw(renderable: Any, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def header(text: str) -> str:
    """The header line: the line above the rule."""
    lines = text.splitlines()
    return lines[next(i for i, ln in enumerate(lines) if ln.startswith("─")) - 1]


def shown(text: str) -> list[str]:
    """The column names in the header line (CKPT AGE is one)."""
    return [n.replace("\0", " ") for n in header(text).replace("CKPT AGE", "CKPT\0AGE").split()]


def row_line(text: str, run_id: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(run_id + " ")]
    return line


def assert_whole(text: str, rows: list[dict[str, Any]], width: int) -> None:
    """Nothing cut or squeezed: no ellipsis, no line wider than the terminal, and every run's id, state
    and step whole on the run's first line."""
    assert "…" not in text, text
    assert max(cell_len(ln) for ln in text.splitlines()) <= width, text
    for r in rows:
        line = row_line(text, r["run_id"])
        assert re.search(rf" {r['state']}( |$)", line), (r["state"], text)
        step = "-" if r["step"] is None else f"{r['step']}/{r['total_steps']}"
        assert re.search(rf" {re.escape(step)}( |$)", line), (step, text)


@pytest.mark.parametrize("width", [80, 120])
def test_status_keeps_run_state_and_step_whole(rows: list[dict[str, Any]], width: int) -> None:
    text = draw(render.grouped(rows), width)
    assert_whole(text, rows, width)
    names = shown(text)
    assert {*CORE, *NEXT} <= set(names), text  # 80 columns: RUN STATE STEP CKPT AGE LR EMA ETA
    assert {"RUNNING", "PREEMPTED", "COMPLETED", "PENDING", "STALLED", "FAILED"} <= set(text.split())
    assert "13h53m" in text and "0.000123" in text.split()  # the ETA, and an LR whole
    if width == 120:
        assert "KNN@1" in names and "41.2% @8" in text  # the most useful of the rest


def test_status_at_80_columns_wraps_the_detail_not_the_state(rows: list[dict[str, Any]]) -> None:
    text = draw(render.grouped(rows), 80)
    stalled = rows[7]
    line = row_line(text, stalled["run_id"])
    assert " STALLED (no" in line  # the detail goes on below, in the STATE column
    words = " ".join(text.split())
    for word in ("progress", "612", "hang", "timeout", "600"):
        assert f" {word} " in f" {words} ", word
    assert "starts" in text.split()  # the pending run's expected start, wrapped if need be


@pytest.mark.parametrize("width", [80, 100, 120])
def test_long_run_ids_and_steps_drop_columns_and_cut_none(big: list[dict[str, Any]], width: int) -> None:
    text = draw(render.table(big), width)
    assert_whole(text, big, width)
    names = shown(text)
    assert set(CORE) <= set(names), text
    if "LR" in names:
        for r in big:
            assert f"{r['lr']:.3g}" in row_line(text, r["run_id"]).split()


def test_columns_go_in_priority_order(big: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """From 250 columns down to 70 the columns shown are always the most important ones: a column is
    only ever gone after every column less important than it."""
    for data in (rows, big):
        for width in range(250, 69, -3):
            text = draw(render.table(data), width)
            assert_whole(text, data, width)
            names = shown(text)
            assert set(names) == set(PRIORITY[: len(names)]), (width, names)
            assert names == [n for n in EVERY if n in names]  # in the table's own order
    assert shown(draw(render.table(rows), 250)) == EVERY


def test_a_terminal_too_narrow_for_the_core_folds_rather_than_cuts(big: list[dict[str, Any]]) -> None:
    text = draw(render.table(big), 50)
    assert "…" not in text and max(cell_len(ln) for ln in text.splitlines()) <= 50
    assert shown(text) == CORE


@pytest.mark.parametrize("width", [80, 90])
def test_a_run_id_too_long_folds_and_the_state_and_step_stay_whole(
    big: list[dict[str, Any]], width: int
) -> None:
    """A spec name of 64 characters (the most a name may have) makes an 85-character run id: the id folds
    over lines, the state and the step stay whole on its first line."""
    long = [r | {"run_id": "n" * 64 + r["run_id"][-21:]} for r in big]
    text = draw(render.table(long), width)
    assert "…" not in text and max(cell_len(ln) for ln in text.splitlines()) <= width, text
    firsts = [ln for ln in text.splitlines() if ln.startswith("n" * 20)]  # each row's first line, in order
    assert len(firsts) == len(long), text
    for r, line in zip(long, firsts, strict=True):
        step = f"{r['step']}/{r['total_steps']}"
        assert re.search(rf" {r['state']}( |$)", line) and f" {step}" in line, text


def test_sweep_and_evaluation_tables_fit_80_columns(rows: list[dict[str, Any]]) -> None:
    ev = {"task": "knn", "eval_id": "knn-1", "job_id": "4242", "after": "4241", "state": "COMPLETED",
          "reason": "", "step": 12, "top1": 0.523, "top5": 0.901}  # fmt: skip
    members = [
        r
        | {"sweep_id": "sw-20261207", "loss": 1.2345}
        | {"sweep_values": {"optim.base_lr": [2.0, 4.0][i % 2], "model.ppm_gamma": [1, 2][i // 2]}}
        | {"evals": [ev if i % 2 else ev | {"state": "PENDING", "reason": "waits on job 4241"}]}
        for i, r in enumerate(rows[:4])
    ]
    for width in (80, 120):
        text = draw(render.grouped(members), width)
        sweep = text[text.index("sweep sw-20261207") : text.index("evaluations")]
        assert_whole(sweep, members, width)
        assert shown(sweep)[:2] == ["RUN", "base_lr"] and "STATE" in shown(sweep), sweep
        for r in members:
            line = row_line(sweep, r["run_id"])
            assert f" {r['sweep_values']['optim.base_lr']} " in line, line
        if "EVAL" in shown(sweep):  # wraps at words, over a few lines at most
            assert "52.3%" in sweep.split() and len(sweep.splitlines()) <= 2 + 3 * len(members), sweep
        evaluations = text[text.index("evaluations") :]
        assert "…" not in evaluations and "top-1 52.3% top-5 90.1% @ step 12" in " ".join(evaluations.split())
    wide = draw(render.grouped(members), 200)
    assert "optim.base_lr" in wide and "model.ppm_gamma" in wide and "EVAL" in wide  # unabbreviated


def test_watch_refits_at_each_refresh(rows: list[dict[str, Any]]) -> None:
    """``--watch`` draws the same renderable through rich's Live: it fits the console as it is drawn."""
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None, record=True)
    with Live(render.grouped(rows), console=console, auto_refresh=False) as live:
        live.update(render.grouped(rows), refresh=True)
    frames = [f for f in re.split(r"(?=^|RUN +STATE )", console.export_text()) if f.strip()]
    assert len(frames) == 3  # started, updated, stopped: each frame drawn anew at the console's width
    for frame in frames:
        assert "…" not in frame and max(cell_len(ln) for ln in frame.splitlines()) <= 80, frame
        assert shown(frame) == [*CORE, *NEXT] and {"COMPLETED", "PREEMPTED"} <= set(frame.split())
    view = render.grouped(rows)  # one renderable, drawn at two widths
    assert "IMG/S" not in draw(view, 80) and "IMG/S" in draw(view, 200)


def test_pixpro_status_on_an_80_column_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command itself, as a terminal of 80 columns (``COLUMNS``) runs it."""
    from cluster import hot

    records = fake_runs(tmp_path / "home", 6)
    monkeypatch.setenv("PIXPRO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    hot.status(None, as_json=False, watch=False, interval=5.0)
    text = Text.from_ansi(capsys.readouterr().out).plain
    assert "…" not in text and max(cell_len(ln) for ln in text.splitlines()) <= 80, text
    assert shown(text) == [*CORE, *NEXT], text
    for rec, state in zip(records, ("COMPLETED", "PREEMPTED", "FAILED", "COMPLETED"), strict=False):
        if rec.executor == "local":
            assert re.search(rf" {state}( |$)", row_line(text, rec.run_id)), text


def test_one_member_of_a_sweep_gets_the_full_row(rows: list[dict[str, Any]]) -> None:
    """``pixpro status MEMBER``: the run's own row (checkpoint age, LR, EMA ...), not its sweep's table of
    swept values."""
    member = rows[4] | {"sweep_id": "sw-20261207", "sweep_values": {"optim.base_lr": 2.0}, "loss": 1.2}
    alone = draw(render.grouped([member], by_sweep=False), 200)
    assert shown(alone) == EVERY and "sweep sw-20261207" not in alone, alone
    assert "sweep sw-20261207" in draw(render.grouped([member]), 200)  # pixpro status SWEEP
