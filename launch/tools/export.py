"""Export a run's online encoder for transfer: torchvision ``state_dict`` or detectron2 pickle.

    python -m launch.tools.export CHECKPOINT [--spec SPEC] --format torchvision|detectron2 -o FILE [--force]

``torchvision``: ``torch.save`` of the backbone's ``state_dict``; it loads with ``strict=True`` into
``torchvision.models.get_model(name)`` once the classifier is removed (``fc`` for ResNets), or with
``strict=False`` reporting only the classifier as missing.

``detectron2``: the official code's conversion (it is MoCo's): a pickle of numpy arrays
``{"model": ..., "__author__": "pixpro", "matching_heuristics": True}`` with torchvision ResNet keys
renamed to detectron2's (``conv1`` -> ``stem.conv1``, ``layerN`` -> ``res{N+1}``, ``bnK`` ->
``convK.norm``, ``downsample.0/1`` -> ``shortcut``/``shortcut.norm``). BN's ``num_batches_tracked``
is dropped: detectron2's norms have no such buffer. Fine-tune it with RGB input, pixel mean
[123.675, 116.28, 103.53], std [58.395, 57.12, 57.375] and ``RESNETS.STRIDE_IN_1X1 False``.

Exit codes: 0 written, 2 bad input (unknown format, non-ResNet for detectron2, wrong spec, output
exists without ``--force``), 3 checkpoint not found.
"""

from __future__ import annotations

import io
import pickle
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from launch.tools.args import Parser, say
from launch.tools.weights import EXIT_BAD_INPUT, WeightsError, load_encoder
from schemas.contract import EXPORT_FORMATS, atomic_write, atomic_write_target, export_refusal

D2_INPUT_HINT = (
    "detectron2 config: INPUT.FORMAT RGB, MODEL.PIXEL_MEAN [123.675, 116.28, 103.53], "
    "MODEL.PIXEL_STD [58.395, 57.12, 57.375], MODEL.RESNETS.STRIDE_IN_1X1 False"
)


def torchvision_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's ``state_dict`` as plain contiguous CPU tensors (torchvision's own key names)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}


def classifier_keys(name: str, state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the full torchvision model that the export leaves out (its classification head)."""
    full = torchvision.models.get_model(name, weights=None).state_dict()
    return sorted(set(full) - set(state))


def is_resnet(name: str) -> bool:
    return torchvision.models.get_model_builder(name).__module__ == "torchvision.models.resnet"


def detectron2_key(key: str) -> str:
    """One torchvision ResNet key in detectron2's naming, exactly as the official conversion script."""
    if "layer" not in key:
        key = "stem." + key
    key = re.sub(r"layer([1-4])", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"bn([1-3])", r"conv\1.norm", key)
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_checkpoint(name: str, state: dict[str, torch.Tensor]) -> dict:
    """detectron2's pickled-weights dict for a torchvision ResNet ``state``."""
    if not is_resnet(name):
        raise WeightsError(
            f"detectron2 export needs a ResNet backbone (resnet*, resnext*, wide_resnet*), this run has "
            f"{name}; use --format torchvision"
        )
    model = {detectron2_key(k): v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return {"model": model, "__author__": "pixpro", "matching_heuristics": True}


def _write_new(path: Path, data: bytes, force: bool) -> None:
    """Write through a temp file, readable by colleagues (0666 less the umask, not mkstemp's 0600);
    without ``force`` an existing file is never replaced (link is atomic); with it a symbolic link to a
    regular file writes its target, and a FIFO or device is refused, never replaced."""
    atomic_write(path, data, exclusive=not force, mode=0o666)


def _cannot_write(output: Path, exc: OSError) -> WeightsError:
    return WeightsError(f"cannot write {output}: {exc.strerror or exc or type(exc).__name__}")


def export(checkpoint: str, spec: str | None, fmt: str, output: Path, force: bool = False) -> str:
    """Write the export and return a one-line summary; raises :class:`WeightsError`."""
    refusal = export_refusal(fmt, output, force)
    if refusal:
        raise WeightsError(refusal)
    try:
        atomic_write_target(output)  # a FIFO or a device: refused before the checkpoint is read
    except OSError as exc:
        raise _cannot_write(output, exc) from None
    encoder = load_encoder(checkpoint, spec)
    state = torchvision_state(encoder.backbone)
    if fmt == "torchvision":
        stream = io.BytesIO()
        torch.save(state, stream)
        data = stream.getvalue()
        count = len(state)
        left_out = classifier_keys(encoder.name, state)
        detail = f"load into torchvision.models.get_model({encoder.name!r}) without {', '.join(left_out)}"
    else:
        converted = detectron2_checkpoint(encoder.name, state)
        data = pickle.dumps(converted, protocol=4)
        count = len(converted["model"])
        detail = D2_INPUT_HINT
    try:
        _write_new(output, data, force)
    except FileExistsError:
        raise WeightsError(f"output {output} already exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise _cannot_write(output, exc) from None
    step = f" step {encoder.step}" if encoder.step is not None else ""
    return f"wrote {output} ({fmt}, {encoder.name}{step}, {count} tensors); {detail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m launch.tools.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="checkpoint store URL/folder, run folder or .pt file")
    parser.add_argument("--spec", help="the run's spec (default: spec.json beside the run)")
    parser.add_argument("--format", dest="fmt", default="torchvision", help=" or ".join(EXPORT_FORMATS))
    parser.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.spec, args.fmt, args.output, args.force))
    except WeightsError as exc:
        say(f"pixpro export: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
