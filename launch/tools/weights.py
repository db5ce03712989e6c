"""Load a run's online encoder from its checkpoint store, a run folder or a ``.pt`` file.

The online backbone (not the EMA target) is what the official code transfers, so that is what every
tool here (export, probe) uses. A checkpoint alone does not say which torchvision architecture it
holds, so the run spec is needed: given explicitly, else found beside the run (``spec.json`` in the
run folder, which is ``<store>/..`` for the default local layout, or the run folder named by the
``run.json`` record the CLI keeps beside the checkpoints).

Accepted sources:

* a checkpoint store URL or folder (``runs/x/checkpoints``, ``s3://bucket/run``): its newest valid
  checkpoint, falling back to older ones when a file fails its checksum;
* a run folder holding ``checkpoints/`` (and usually ``spec.json``);
* a ``.pt`` file: a checkpoint's ``train.pt``, a bare ``PixPro.state_dict()``, or exported
  torchvision weights (backbone keys only).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launch.checkpoint import TRAIN_FILE
from launch.store import CheckpointStore, StoreError
from launch.tools.args import say
from launch.train_state import model_weights
from pixpro.model import build_backbone
from schemas import RunSpec, SpecError, load_spec, spec_hash
from schemas.contract import LATEST, RECORD_FILE, Exit, RunPaths

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = Exit.USAGE
EXIT_NOT_FOUND = Exit.NOT_FOUND


class WeightsError(Exception):
    """A one-line, user-facing problem with the weights' source; ``exit_code`` is 2 or 3 (not found)."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


@dataclass(frozen=True)
class Location:
    """Where weights live: a checkpoint store URL or a ``.pt`` file, and the run folder if known."""

    kind: str  # "store" or "file"
    url: str
    run_dir: Path | None = None


@dataclass
class Encoder:
    """A loaded online encoder and where it came from (for summaries)."""

    backbone: nn.Module
    name: str
    step: int | None
    source: str
    spec: RunSpec


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith(("file://", "local://"))


def locate(checkpoint: str | Path) -> Location:
    """Classify a user-given checkpoint argument; a missing local path raises (exit 3)."""
    text = str(checkpoint)
    if _is_remote(text):
        return Location("store", text)
    path = Path(text.split("://", 1)[1] if "://" in text else text).expanduser()
    if not path.exists():
        raise WeightsError(f"checkpoint {text} does not exist", EXIT_NOT_FOUND)
    if path.is_file():
        return Location("file", str(path), None)
    store = RunPaths(path).checkpoints
    if store.is_dir() and not (path / LATEST).exists():
        return Location("store", str(store), path)
    parent = path.resolve().parent
    return Location("store", str(path), parent if RunPaths(parent).spec.is_file() else None)


def find_spec(location: Location, store: CheckpointStore | None = None) -> Path | None:
    """The run's ``spec.json``: in the run folder, beside a ``.pt`` file, or via the store's run record."""
    candidates: list[Path] = []
    if location.run_dir is not None:
        candidates.append(RunPaths(location.run_dir).spec)
    if location.kind == "file":
        candidates.append(RunPaths(Path(location.url).parent).spec)
    if store is not None:
        try:
            body = store.read_aux(RECORD_FILE)
            run_dir = json.loads(body)["run_dir"] if body else None
        except (StoreError, OSError, ValueError, KeyError, TypeError):
            run_dir = None
        if isinstance(run_dir, str):
            candidates.append(RunPaths(run_dir).spec)
    return next((p for p in candidates if p.is_file()), None)


def read_spec(
    spec: RunSpec | str | Path | None, location: Location, store: CheckpointStore | None
) -> RunSpec:
    """The explicit spec, or the one found beside the run; raises a one-line error otherwise."""
    if isinstance(spec, RunSpec):
        return spec
    path = Path(spec) if spec is not None else find_spec(location, store)
    if path is None:
        raise WeightsError(
            f"no run spec found for {location.url}: pass --spec SPEC (the run's spec.json or the spec it "
            "was launched with)"
        )
    try:
        return load_spec(path)
    except SpecError as exc:
        raise WeightsError(f"spec {path}: {'; '.join(exc.problems)}") from None


def _open_store(url: str) -> CheckpointStore:
    try:
        return CheckpointStore(url)
    except (StoreError, ValueError, ImportError, OSError) as exc:
        raise WeightsError(f"cannot open checkpoint store {url}: {exc}") from None


def _read_store(store: CheckpointStore) -> tuple[Any, int]:
    """``train.pt`` of the newest checkpoint whose file verifies, and its step."""
    try:
        found = store.load_latest([TRAIN_FILE])
    except (StoreError, OSError) as exc:
        raise WeightsError(f"cannot read checkpoints under {store.url}: {exc}") from None
    if found is None:
        raise WeightsError(f"no committed checkpoint under {store.url}", EXIT_NOT_FOUND)
    manifest, files = found
    return _torch_load(files[TRAIN_FILE], f"{store.url} step {manifest.step}"), manifest.step


def _torch_load(data: bytes, where: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on pickle protocols it did not write
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors have no common base class
        raise WeightsError(f"{where} is not a readable torch file ({type(exc).__name__})") from None


def backbone_state(
    obj: Any, where: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], int | None, str | None]:
    """The online backbone's tensors from any accepted layout, with the step and spec hash if recorded.

    A ``train.pt`` is read through :func:`launch.train_state.model_weights` (refused without a spec hash);
    a PixPro or torchvision ``state_dict`` saved by other means is taken as it is.
    """
    step = saved_hash = None
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict):  # train.pt
        try:
            obj, step, saved_hash = model_weights(obj, where)
        except SpecError as exc:
            raise WeightsError(str(exc)) from None
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise WeightsError("no model weights found (expected train.pt, a PixPro state_dict or a state_dict)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state, step, saved_hash


def build_encoder(name: str, state: dict[str, torch.Tensor] | None, where: str) -> nn.Module:
    """The feature extractor of ``name`` holding ``state`` (strict), in eval mode."""
    try:
        backbone, _ = build_backbone(name, zero_init_residual=False)
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    if state is not None:
        expected = set(backbone.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise WeightsError(
                f"{where} does not hold {name} weights: {len(missing)} keys missing (e.g. "
                f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); is --spec the run's?"
            )
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
            raise WeightsError(f"{where} does not fit {name}: {first}") from None
    return backbone.eval()


def resolve_spec(checkpoint: str | Path | None, spec: RunSpec | str | Path | None) -> RunSpec:
    """The run spec for ``checkpoint`` (explicit, or found beside the run) without loading weights."""
    if spec is not None or checkpoint is None:
        if spec is None:
            raise WeightsError("no run spec: pass --spec SPEC (or a checkpoint whose run has spec.json)")
        return read_spec(spec, Location("file", str(spec)), None)
    location = locate(checkpoint)
    return read_spec(None, location, _open_store(location.url) if location.kind == "store" else None)


def load_encoder(checkpoint: str | Path, spec: RunSpec | str | Path | None = None) -> Encoder:
    """Load the online encoder (eval mode) described by ``checkpoint`` and the run's spec.

    An explicit spec is checked before the (possibly large) checkpoint is read; a spec to be found
    beside the run is looked for after, so a missing checkpoint reports as such (exit 3).
    """
    location = locate(checkpoint)
    store = _open_store(location.url) if location.kind == "store" else None
    run_spec = read_spec(spec, location, store) if spec is not None else None
    if store is not None:
        obj, step = _read_store(store)
        where = f"{store.url} step {step}"
    else:
        path = Path(location.url)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise WeightsError(f"cannot read {path}: {exc.strerror}") from None
        obj, step, where = _torch_load(data, str(path)), None, str(path)
    if run_spec is None:
        run_spec = read_spec(None, location, store)
    state, recorded_step, saved_hash = backbone_state(obj, where)
    step = step if step is not None else recorded_step
    if saved_hash is not None and saved_hash != spec_hash(run_spec):
        log.warning(
            "%s was written by a different spec than the one given (only its backbone is used)", where
        )
    name = run_spec.model.backbone
    return Encoder(build_encoder(name, state, where), name, step, where, run_spec)


def load_online_encoder(
    checkpoint: str | Path, spec: RunSpec | str | Path | None = None
) -> tuple[nn.Module, str]:
    """``(backbone in eval mode, torchvision model name)`` of a checkpoint's online encoder."""
    encoder = load_encoder(checkpoint, spec)
    return encoder.backbone, encoder.name


def encoder_or_random(
    checkpoint: str | None,
    spec: RunSpec | str | Path | None,
    random_init: bool,
    seed: int,
    backbone_name: str | None = None,
) -> tuple[nn.Module, str, str, int | None]:
    """What an evaluation scores: ``(backbone, architecture, "pixpro" or "random-init", step)`` of a
    checkpoint's online encoder, or of the same architecture at torchvision's initialization seeded
    with ``seed`` (the baseline pretraining must beat)."""
    if random_init:
        name = backbone_name or resolve_spec(checkpoint, spec).model.backbone
        torch.manual_seed(seed)
        return build_encoder(name, None, "random init"), name, "random-init", None
    if checkpoint is None:
        raise WeightsError("give a CHECKPOINT (or --random-init for the baseline)")
    encoder = load_encoder(checkpoint, spec)
    return encoder.backbone, encoder.name, "pixpro", encoder.step


def report(evaluate: Callable[[], Any], as_json: bool, text: Callable[[Any], str]) -> int:
    """An evaluation tool's ending: its result (a dataclass) as JSON or text, or one error line and
    the error's exit status (2 bad input, 3 not found)."""
    try:
        result = evaluate()
    except WeightsError as exc:
        say(f"pixpro eval: error: {exc}")
        return exc.exit_code
    print(json.dumps(asdict(result), indent=2) if as_json else text(result))
    return 0
