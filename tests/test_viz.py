"""Figures: positive-pair views and training curves are real PNGs showing exactly the data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.records import read_metrics
from launch.store import CheckpointStore
from launch.tools.plots import DPI, FIGSIZE, metrics_figure
from launch.tools.viz import PAIRS_FIGSIZE, main, pairs_figure
from tests.support.trainer import REPO


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


@pytest.fixture
def image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


def _centres(box: list[float], grid: int) -> np.ndarray:
    """Cell centres in the image as the reference page spells out O's computation."""
    x_ul, y_ul, x_lr, y_lr = box
    bw, bh = (x_lr - x_ul) / grid, (y_lr - y_ul) / grid
    return np.array(
        [[x_ul + (c + 0.5) * bw, y_ul + (r + 0.5) * bh] for r in range(grid) for c in range(grid)]
    )


def test_pairs_png_and_matches_follow_the_distance_rule(image, tmp_path, capsys):
    out = tmp_path / "pairs.png"
    assert main(["pairs", str(image), "-o", str(out), "--crop", "96", "--seed", "3", "--cell", "1", "2"]) == 0
    assert "positive cells in view 2" in capsys.readouterr().out
    assert _png_size(out) == (PAIRS_FIGSIZE[0] * 100, PAIRS_FIGSIZE[1] * 100)

    for seed in range(4):
        _, data = pairs_figure(image, crop=96, seed=seed, cell=(1, 2))
        assert data.grid == 3 and data.cell == (1, 2) and data.image_size == (128, 96)  # upscaled to the crop
        b1, b2 = data.boxes.tolist()
        c1, c2 = _centres(b1, 3), _centres(b2, 3)
        diag = max(math.hypot((b[2] - b[0]) / 3, (b[3] - b[1]) / 3) for b in (b1, b2))
        dist = np.linalg.norm(c2 - c1[1 * 3 + 2], axis=1) / diag
        assert data.matches == [divmod(j, 3) for j in np.flatnonzero(dist < 0.7)]


def test_pairs_default_cell_has_most_matches_and_bad_cells_are_refused(image, tmp_path, capsys):
    fig, data = pairs_figure(image, crop=64, seed=1)
    counts = [len(pairs_figure(image, crop=64, seed=1, cell=divmod(i, 2))[1].matches) for i in range(4)]
    assert len(data.matches) == max(counts) > 0
    assert len(fig.axes) == 3
    assert main(["pairs", str(image), "-o", str(tmp_path / "x.png"), "--crop", "64", "--cell", "2", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pixpro viz: error: ") and "off the 2x2 grid" in err
    assert main(["pairs", str(tmp_path / "missing.png"), "-o", str(tmp_path / "x.png")]) == 3
    assert not (tmp_path / "x.png").exists()
    capsys.readouterr()
    assert main(["pairs", str(image), "-o", str(tmp_path / "x.png"), "--crop", "100000"]) == 2
    assert "--crop 100000: give 32 (one feature cell) to 1024 pixels" in capsys.readouterr().err
    out = tmp_path / "x.png"
    for force, code in (([], 0), (["--force"], 0), ([], 2)):  # drawn, again with --force, refused without
        assert main(["pairs", str(image), "-o", str(out), "--crop", "64", *force]) == code, force
    for name, magic in (("x.svg", b"<?xml"), ("x.pdf", b"%PDF"), ("x.jpg", b"\xff\xd8"), ("x", b"\x89PNG")):
        assert main(["pairs", str(image), "-o", str(tmp_path / name), "--crop", "64"]) == 0
        assert (tmp_path / name).read_bytes().startswith(magic), name  # the format its name asks for
    assert main(["pairs", str(image), "-o", str(tmp_path / "x.bmp"), "--crop", "64"]) == 2
    assert not (tmp_path / "x.bmp").exists()
    assert "already exists; pass --force to overwrite it" in capsys.readouterr().err


def _write_metrics(url: str) -> None:
    """Attempt a logs steps 1-6 and is preempted; attempt b resumes from the step-4 checkpoint."""
    store = CheckpointStore(url)
    for attempt, steps, t0 in (("job1.0", range(1, 7), 1000.0), ("job1.1", range(5, 11), 2000.0)):
        lines = [
            json.dumps(
                {
                    "step": s,
                    "attempt": attempt,
                    "time": t0 + s,
                    "loss": -0.1 * s - (0.05 if attempt == "job1.1" else 0),
                    "lr": 0.01 * s,
                    "ema_momentum": 0.99 + 0.001 * s,
                }
                | ({"resumed_from": 4} if attempt == "job1.1" else {})
            )
            for s in steps
        ]
        store.put_aux(f"metrics/{attempt}.000000.jsonl", ("\n".join(lines) + "\n").encode())


def test_plot_draws_exactly_the_metrics_and_marks_the_resume(tmp_path, capsys):
    url = str(tmp_path / "run" / "checkpoints")
    _write_metrics(url)
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "run"), "-o", str(out)]) == 0  # a run folder stands for its store
    assert "10 logged steps, 1 resume(s)" in capsys.readouterr().out
    assert _png_size(out) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))

    records = read_metrics(CheckpointStore(url))
    fig, data = metrics_figure(records)
    assert data.resumes == [(4, "job1.1")]  # the checkpoint it resumed from, not its first record
    for ax, key in zip(fig.axes, ("loss", "lr", "ema_momentum"), strict=True):
        (line,) = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 2]
        assert list(line.get_xdata()) == [r["step"] for r in records] == list(range(1, 11))
        assert list(line.get_ydata()) == [r[key] for r in records]
        markers = [ln for ln in ax.get_lines() if ln is not line]
        assert [list(m.get_xdata()) for m in markers] == [[4, 4]]
    assert data.series["loss"][1][4:] == [-0.1 * s - 0.05 for s in range(5, 11)]  # the resumed attempt wins


def test_plot_errors_and_needs_no_torch(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "a.png")]) == 3
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "a.png")]) == 3
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": error: ")[0] for line in err] == ["pixpro plot"] * 2 and "no metrics" in err[1]

    _write_metrics(str(tmp_path / "store"))
    code = (
        "import sys; from launch.tools.viz import main; "
        f"assert main(['plot', {str(tmp_path / 'store')!r}, '-o', {str(tmp_path / 'b.png')!r}]) == 0; "
        "assert 'torch' not in sys.modules, 'plot imported torch'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _png_size(tmp_path / "b.png") == (800, 750)


@pytest.mark.timeout(120)  # without the refusal, the write into the FIFO waits for a reader
def test_plot_force_never_replaces_a_fifo_or_a_device_and_writes_through_a_link_to_a_file(tmp_path, capsys):
    """``--force`` replaces a file's contents: a FIFO or a link to a device stays what it was (one line,
    exit 2, a reason in words, never "None"), and a link to a regular file writes its target."""
    import os

    _write_metrics(str(tmp_path / "run" / "checkpoints"))
    fifo, null = tmp_path / "ff.png", tmp_path / "null.png"
    os.mkfifo(fifo)
    null.symlink_to(os.devnull)
    for out, kind in ((fifo, "a FIFO"), (null, "a character device")):
        assert main(["plot", str(tmp_path / "run"), "-o", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert err == f"pixpro plot: error: cannot write {out}: exists and is {kind}, not a regular file\n"
    assert fifo.is_fifo() and null.is_symlink() and os.readlink(null) == os.devnull

    target, link = tmp_path / "curves.png", tmp_path / "link.png"
    target.write_bytes(b"old")
    link.symlink_to(target.name)
    assert main(["plot", str(tmp_path / "run"), "-o", str(link), "--force"]) == 0
    assert link.is_symlink() and _png_size(target) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["curves.png", "ff.png", "link.png", "null.png", "run"]  # no temp file left
