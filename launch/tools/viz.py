"""Figures: the positive pairs PixPro learns from, and a run's training curves.

    python -m launch.tools.viz pairs IMAGE -o out.png [--seed S] [--crop 224] [--cell R C]
    python -m launch.tools.viz plot CHECKPOINT_URL -o out.png

``pairs`` draws the image with both crop boxes, then the two augmented views (un-normalized) with
their feature-map cell centres (``crop // 32`` per side, 7x7 at 224). One cell of view 1 (``--cell``,
default the one with most matches) is joined by lines to its positive cells in view 2: those whose
centres lie within 0.7 bin diagonals in the original image (:func:`pixpro.geometry.positive_mask`),
the pairs the pixel-propagation loss pulls together. ``plot`` draws loss, LR and EMA momentum from the
metrics beside the checkpoints (see :mod:`launch.tools.plots`; no torch needed), one line per resume.

Exit codes: 0 written, 2 bad input (unreadable image, cell off the grid, an existing output file
without ``--force``), 3 image or run not found.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from launch.tools.args import Parser, say
from launch.tools.plots import EXIT_BAD_INPUT, EXIT_NOT_FOUND, PlotError, figure_format, plot_run
from schemas.contract import output_refusal

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

STRIDE = 32  # ResNet C5: one feature-map cell per 32 input pixels
MAX_CROP = 1024  # 32 x 32 cells: more is no figure, and 100,000 px views would take tens of GB
PAIRS_FIGSIZE = (13.5, 4.8)
DPI = 100  # PAIRS_FIGSIZE * DPI = 1350 x 480 pixels
THRESHOLD = 0.7


@dataclass
class PairsData:
    """What the pairs figure shows, in numbers (for tests and captions)."""

    grid: int
    cell: tuple[int, int]  # (row, column) of the chosen view-1 cell
    matches: list[tuple[int, int]]  # its positive cells in view 2
    positives: int  # positive pairs over all cells
    boxes: torch.Tensor  # [2, 4] normalized crop boxes (x_ul, y_ul, x_lr, y_lr), flips swap x
    image_size: tuple[int, int]  # (width, height) after any upscaling


def load_image(path: str | Path, crop: int) -> tuple[torch.Tensor, bool]:
    """uint8 ``[3, H, W]``, upscaled (bilinear) when its short side is below the crop; and whether it was."""
    import torch
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise PlotError(f"image {path} does not exist", EXIT_NOT_FOUND)
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except OSError as exc:
        raise PlotError(f"cannot read image {path}: {exc}") from None
    scale = crop / min(image.size)
    if scale > 1:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR
        )
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), scale > 1


def _display(view: torch.Tensor) -> np.ndarray:
    """A normalized ``[3, S, S]`` view back to displayable ``[S, S, 3]`` RGB in [0, 1]."""
    from pixpro.augment import IMAGENET_MEAN, IMAGENET_STD

    pixels = view.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return pixels.clip(0, 1)


def _cell_xy(grid: int, crop: int) -> np.ndarray:
    """Cell centres in view pixels, ``[grid*grid, 2]`` (x, y), row-major like the feature map."""
    c = (np.arange(grid) + 0.5) * crop / grid - 0.5
    xx, yy = np.meshgrid(c, c)
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def pairs_figure(
    image_path: str | Path, crop: int = 224, seed: int = 0, cell: tuple[int, int] | None = None
) -> tuple[Figure, PairsData]:
    """Two views of one image with cell centres and one cell's positive matches joined by lines."""
    # torch is imported here, not at the top, so that ``viz plot`` runs where torch is not installed.
    import torch
    from matplotlib.figure import Figure
    from matplotlib.patches import ConnectionPatch, Rectangle

    from pixpro.augment import TwoViewTransform
    from pixpro.geometry import cell_geometry, positive_mask

    if not STRIDE <= crop <= MAX_CROP:
        raise PlotError(f"--crop {crop}: give {STRIDE} (one feature cell) to {MAX_CROP} pixels")
    image, upscaled = load_image(image_path, crop)
    views = TwoViewTransform(crop_size=crop)(image, torch.Generator().manual_seed(seed))
    grid = crop // STRIDE
    boxes = torch.stack([views.coords1, views.coords2])
    g1, g2 = (cell_geometry(b[None], grid, grid) for b in boxes)
    mask = positive_mask(g1, g2, THRESHOLD)[0]  # [n1, n2]
    if cell is None:
        index = int(mask.sum(1).argmax())
    else:
        if not all(0 <= v < grid for v in cell):
            raise PlotError(f"--cell {cell[0]} {cell[1]} is off the {grid}x{grid} grid (0..{grid - 1})")
        index = cell[0] * grid + cell[1]
    matched = [int(j) for j in torch.nonzero(mask[index]).flatten()]
    data = PairsData(
        grid=grid,
        cell=divmod(index, grid),
        matches=[divmod(j, grid) for j in matched],
        positives=int(mask.sum()),
        boxes=boxes,
        image_size=(image.shape[2], image.shape[1]),
    )

    fig = Figure(figsize=PAIRS_FIGSIZE, dpi=DPI, layout="constrained")
    ax0, ax1, ax2 = fig.subplots(1, 3)
    width, height = data.image_size
    ax0.imshow(image.permute(1, 2, 0).numpy())
    colours = ("tab:orange", "tab:cyan")
    for k, (box, colour) in enumerate(zip(boxes.tolist(), colours, strict=True)):
        x0, x1 = sorted((box[0] * (width - 1), box[2] * (width - 1)))
        y0, y1 = box[1] * (height - 1), box[3] * (height - 1)
        flip = " (flipped)" if box[0] > box[2] else ""
        # The box holds pixel indices; imshow puts pixel centres on integers, edges half a pixel out.
        outline = Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, color=colour, lw=2)
        outline.set_label(f"view {k + 1}{flip}")
        ax0.add_patch(outline)
    scale = np.array([width - 1, height - 1])
    ax0.scatter(*(g1.centres[0, index].numpy() * scale), s=50, c=colours[0], edgecolors="k", zorder=3)
    if matched:
        ax0.scatter(*(g2.centres[0, matched].numpy() * scale).T, s=25, c=colours[1], edgecolors="k", zorder=3)
    ax0.legend(loc="lower right", fontsize="small")
    ax0.set_title(
        f"image {width}x{height}" + (" (upscaled to the crop)" if upscaled else ""), fontsize="medium"
    )

    xy = _cell_xy(grid, crop)
    half = crop / grid / 2
    for ax, view, colour, name in (
        (ax1, views.view1, colours[0], "view 1"),
        (ax2, views.view2, colours[1], "view 2"),
    ):
        ax.imshow(_display(view))
        ax.scatter(xy[:, 0], xy[:, 1], s=12, c="white", edgecolors="k", linewidths=0.5)
        ax.set_title(f"{name}: {grid}x{grid} cells", fontsize="medium", color=colour)
    r, c = data.cell
    ax1.add_patch(Rectangle(xy[index] - half, 2 * half, 2 * half, fill=False, color="red", lw=2))
    for j in matched:
        ax2.add_patch(Rectangle(xy[j] - half, 2 * half, 2 * half, fill=False, color="red", lw=2))
        fig.add_artist(
            ConnectionPatch(xy[index], xy[j], "data", "data", axesA=ax1, axesB=ax2, color="red", lw=1)
        )
    for ax in (ax0, ax1, ax2):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"cell ({r}, {c}) of view 1 has {len(matched)} positive cell(s) in view 2 (centres closer than "
        f"{THRESHOLD} bin diagonals in the image); {data.positives} positive pairs in all, seed {seed}",
        fontsize="medium",
    )
    return fig, data


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m launch.tools.viz", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pairs = sub.add_parser("pairs", help="two augmented views and their positive cell pairs")
    pairs.add_argument("image", type=Path)
    pairs.add_argument("-o", "--output", type=Path, required=True)
    pairs.add_argument("--seed", type=int, default=0, help="augmentation seed")
    pairs.add_argument("--crop", type=int, default=224, help="view size in pixels (cells = crop // 32)")
    pairs.add_argument("--cell", type=int, nargs=2, metavar=("R", "C"), help="view-1 cell to match")
    plot = sub.add_parser("plot", help="loss, LR and EMA momentum of a run against step")
    plot.add_argument("checkpoint_url", help="checkpoint store URL/folder or run folder")
    plot.add_argument("-o", "--output", type=Path, required=True)
    for each in (pairs, plot):
        each.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = parser.parse_args(argv)
    name = "pixpro viz" if args.command == "pairs" else "pixpro plot"  # the command the user typed
    try:
        refusal = output_refusal(args.output, args.force)
        if refusal:
            raise PlotError(refusal)
        figure_format(args.output)  # before any drawing
        if args.command == "pairs":
            fig, data = pairs_figure(
                args.image, args.crop, args.seed, tuple(args.cell) if args.cell else None
            )
            fig.savefig(args.output, format=figure_format(args.output))
            detail = f"cell {data.cell} of view 1 -> {len(data.matches)} positive cells in view 2"
        else:
            plotted = plot_run(args.checkpoint_url, args.output, args.force)
            steps = plotted.series["loss"][0]
            detail = f"{len(steps)} logged steps, {len(plotted.resumes)} resume(s)"
    except PlotError as exc:
        say(f"{name}: error: {exc}")
        return exc.exit_code
    except FileExistsError:  # created meanwhile: kept
        say(f"{name}: error: output {args.output} already exists; pass --force to overwrite it")
        return EXIT_BAD_INPUT
    except OSError as exc:
        say(f"{name}: error: cannot write {args.output}: {exc.strerror or exc or type(exc).__name__}")
        return EXIT_BAD_INPUT
    print(f"wrote {args.output} ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
