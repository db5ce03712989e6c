"""Training curves from a run's metrics records: loss, learning rate and EMA momentum against step.

Torch-free (matplotlib's object API, no pyplot state), so a login node can draw a run's curves from
the metrics beside its checkpoints. A vertical line marks every resume: where the records' ``attempt``
changes, at the checkpoint step the new attempt resumed from (``resumed_from``).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from schemas.contract import Exit, RunPaths, atomic_write, atomic_write_target

EXIT_BAD_INPUT = Exit.USAGE
EXIT_NOT_FOUND = Exit.NOT_FOUND

PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("ema_momentum", "EMA momentum"),
)
FIGSIZE = (8.0, 7.5)  # inches
DPI = 100  # FIGSIZE * DPI = the PNG's pixel size, 800 x 750


class PlotError(Exception):
    """A one-line, user-facing problem; ``exit_code`` 2 (bad input) or 3 (not found)."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


@dataclass
class PlotData:
    """Exactly what was drawn: per panel the (steps, values) series, and the resume steps."""

    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    resumes: list[tuple[int, str]] = field(default_factory=list)  # (step resumed from, attempt)


def plot_data(records: Sequence[dict[str, Any]]) -> PlotData:
    """Series of each panel (records lacking a value are skipped) and where the attempt changes."""
    records = sorted((r for r in records if isinstance(r.get("step"), int)), key=lambda r: r["step"])
    data = PlotData()
    for key, _ in PANELS:
        points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
        data.series[key] = ([s for s, _ in points], [v for _, v in points])
    for before, after in itertools.pairwise(records):
        if after.get("attempt") != before.get("attempt"):
            start = after.get("resumed_from")
            step = start if isinstance(start, int) else after["step"]  # older records lack it
            data.resumes.append((step, str(after.get("attempt"))))
    return data


def metrics_figure(records: Sequence[dict[str, Any]], title: str = "") -> tuple[Figure, PlotData]:
    """Three stacked panels sharing the step axis; returns the figure and the data it shows."""
    data = plot_data(records)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        steps, values = data.series[key]
        ax.plot(steps, values, color="tab:blue", linewidth=1.2, label=label)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        for i, (step, _) in enumerate(data.resumes):
            ax.axvline(step, color="tab:red", linestyle="--", linewidth=1, label="resume" if i == 0 else None)
    axes[-1].set_xlabel("step")
    if data.resumes:
        axes[0].legend(loc="upper right", fontsize="small")
    attempts = len(data.resumes) + 1 if records else 0
    fig.suptitle(f"{title}  ({attempts} attempt{'s' if attempts != 1 else ''})".strip(), fontsize="medium")
    return fig, data


FIGURE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpeg", ".jpeg": "jpeg"}
"""A figure's format, by its file name's suffix (none: PNG)."""


def figure_format(path: str | Path) -> str:
    """The format ``path`` asks for; a suffix no figure is written as is refused (``-o x.bmp`` got PNG
    bytes)."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return "png"
    if suffix not in FIGURE_FORMATS:
        raise PlotError(f"-o {Path(path).name}: write a {', '.join(FIGURE_FORMATS)} file (or no suffix: PNG)")
    return FIGURE_FORMATS[suffix]


def save_metrics_plot(
    records: Sequence[dict[str, Any]], path: str | Path, title: str = "", force: bool = True
) -> PlotData:
    """Draw the curves (``FIGSIZE * DPI`` pixels) in the format the file name asks for; returns the
    plotted data. The file is written whole or not at all (``atomic_write``: a symbolic link to a file
    writes its target, a FIFO or device is refused); without ``force`` an existing one is kept."""
    fig, data = metrics_figure(records, title)
    image = io.BytesIO()
    fig.savefig(image, format=figure_format(path))
    atomic_write(Path(path), image.getvalue(), exclusive=not force, mode=0o666)
    return data


def store_url(path: str) -> str:
    """A run folder stands for its ``checkpoints/`` store; a missing local path raises (exit 3)."""
    if "://" in path and not path.startswith("file://"):
        return path
    local = Path(path.removeprefix("file://")).expanduser()
    if not local.is_dir():
        raise PlotError(f"checkpoint store {path} does not exist", EXIT_NOT_FOUND)
    store = RunPaths(local).checkpoints
    return str(store) if store.is_dir() else str(local)


def plot_run(url: str, output: str | Path, force: bool = True) -> PlotData:
    """Read a run's metrics (store URL or run folder) and save its curves as a PNG."""
    from launch.records import read_metrics
    from launch.store import CheckpointStore, StoreError

    atomic_write_target(Path(output))  # a FIFO or a device: refused before the metrics are read
    url = store_url(url)
    try:
        records = read_metrics(CheckpointStore(url))
    except (StoreError, OSError, ValueError) as exc:
        raise PlotError(f"cannot read metrics under {url}: {exc}") from None
    if not records:
        raise PlotError(f"no metrics under {url} (has the run logged a step yet?)", EXIT_NOT_FOUND)
    return save_metrics_plot(records, output, title=url, force=force)
