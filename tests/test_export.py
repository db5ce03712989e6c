"""Export of the online encoder: torchvision state_dict and detectron2 pickle, from a real trainer run."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from launch.builders import build_model
from launch.tools.export import main
from launch.tools.weights import load_online_encoder
from pixpro.model import build_backbone
from schemas import load_spec
from tests.support.shared import run_once
from tests.support.trainer import final_state, tiny_spec, write_spec

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 10-step resnet18 run laid out as the CLI does: run/spec.json, run/checkpoints/ (the
    formats are the resnet family's: torchvision's resnet18 and detectron2's ResNet)."""
    spec = tiny_spec(Path("data"), model__backbone="resnet18")
    return run_once(tmp_path_factory, "tiny-run-resnet18", spec) / "run"


def _export(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _online_encoder_from_checkpoint(run: Path) -> nn.Module:
    """The checkpoint's online encoder rebuilt as the trainer built it (not through launch.tools.weights)."""
    model = build_model(load_spec(run / "spec.json"))
    model.load_state_dict(final_state(str(run / "checkpoints"))["train.pt"]["state"]["model"])
    return model.online_encoder().eval()


def test_torchvision_export_loads_into_stock_torchvision_and_round_trips(run, tmp_path, capsys):
    out = tmp_path / "r18.pt"
    code, stdout, err = _export(capsys, run / "checkpoints", "--spec", run / "spec.json", "-o", out)
    assert code == 0, err
    assert "without fc.bias, fc.weight" in stdout
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # as any new file: readable by colleagues
    state = torch.load(out, weights_only=True)

    stock = torchvision.models.get_model("resnet18", weights=None)
    missing, unexpected = stock.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    stock.fc = nn.Identity()
    stock.load_state_dict(state, strict=True)
    extractor, _ = build_backbone("resnet18")
    extractor.load_state_dict(state, strict=True)

    online = _online_encoder_from_checkpoint(run)
    fresh = build_model(load_spec(run / "spec.json")).online_encoder()
    trained, init = online.state_dict(), fresh.state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # training changed the weights
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = online(x)
        got = extractor.eval()(x)
        pooled = stock.eval()(x)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert torch.allclose(pooled, want.mean((2, 3)), atol=1e-6, rtol=0)


def test_spec_found_beside_the_run_and_pt_files_load_the_same_encoder(run, tmp_path, capsys):
    via_run_dir = tmp_path / "a.pt"
    assert _export(capsys, run, "-o", via_run_dir)[0] == 0  # run folder: checkpoints/ + spec.json
    via_store = tmp_path / "b.pt"
    assert _export(capsys, run / "checkpoints", "-o", via_store)[0] == 0  # spec from <store>/../spec.json
    a, b = torch.load(via_run_dir, weights_only=True), torch.load(via_store, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    raw = tmp_path / "pixpro.pt"  # a bare PixPro state_dict, as a .pt file
    torch.save(final_state(str(run / "checkpoints"))["train.pt"]["state"]["model"], raw)
    for source in (raw, via_run_dir):
        encoder, name = load_online_encoder(source, run / "spec.json")
        assert name == "resnet18"
        assert all(torch.equal(encoder.state_dict()[k], a[k]) for k in a)


def _d2_resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """detectron2's ResNet-50 (BottleneckBlock, stride in the 3x3) parameter names and shapes, written out."""
    norm = ("weight", "bias", "running_mean", "running_var")
    shapes: dict[str, tuple[int, ...]] = {"stem.conv1.weight": (64, 3, 7, 7)}
    shapes.update({f"stem.conv1.norm.{n}": (64,) for n in norm})
    in_channels = 64
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3), strict=True):
        mid = 64 * 2 ** (stage - 2)
        out = 4 * mid
        for b in range(blocks):
            c_in = in_channels if b == 0 else out
            block = f"res{stage}.{b}"
            convs = {"conv1": (mid, c_in, 1, 1), "conv2": (mid, mid, 3, 3), "conv3": (out, mid, 1, 1)}
            if b == 0:
                convs["shortcut"] = (out, c_in, 1, 1)
            for conv, shape in convs.items():
                shapes[f"{block}.{conv}.weight"] = shape
                shapes.update({f"{block}.{conv}.norm.{n}": (shape[0],) for n in norm})
        in_channels = out
    return shapes


def test_detectron2_export_has_detectron2_resnet50_names_and_shapes(tmp_path, capsys):
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet50", zero_init_residual=False)
    source = {k: v.clone() for k, v in backbone.state_dict().items()}
    source["layer4.2.bn3.running_var"] = torch.linspace(1, 2, 2048)  # a recognizable value to trace
    checkpoint = tmp_path / "r50.pt"
    torch.save(source, checkpoint)
    spec = write_spec(tmp_path / "spec.json", tiny_spec(tmp_path / "data", model__backbone="resnet50"))
    out = tmp_path / "r50.pkl"
    code, stdout, err = _export(capsys, checkpoint, "--spec", spec, "--format", "detectron2", "-o", out)
    assert code == 0, err
    assert "STRIDE_IN_1X1 False" in stdout

    with open(out, "rb") as f:
        converted = pickle.load(f)
    assert converted["__author__"] == "pixpro" and converted["matching_heuristics"] is True
    weights = converted["model"]
    expected = _d2_resnet50_shapes()
    assert len(expected) == 5 + (3 + 4 + 6 + 3) * 15 + 4 * 5
    assert sorted(weights) == sorted(expected)
    for key, shape in expected.items():
        assert isinstance(weights[key], np.ndarray) and weights[key].shape == shape, key
    np.testing.assert_array_equal(
        weights["res5.2.conv3.norm.running_var"], source["layer4.2.bn3.running_var"].numpy()
    )
    np.testing.assert_array_equal(weights["stem.conv1.weight"], source["conv1.weight"].numpy())
    np.testing.assert_array_equal(
        weights["res3.0.shortcut.norm.bias"], source["layer2.0.downsample.1.bias"].numpy()
    )
    np.testing.assert_array_equal(weights["res4.5.conv2.norm.weight"], source["layer3.5.bn2.weight"].numpy())


def _one_clear_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("pixpro export: error:"), err


def test_bad_inputs_exit_with_one_line_and_never_overwrite(run, tmp_path, capsys):
    spec = run / "spec.json"
    out = tmp_path / "w.pt"

    code, _, err = _export(capsys, tmp_path / "nope", "--spec", spec, "-o", out)
    assert code == 3 and "does not exist" in err
    _one_clear_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = _export(capsys, tmp_path / "empty", "-o", out)  # no checkpoint (and no spec) there
    assert code == 3 and "no committed checkpoint" in err
    _one_clear_line(err)

    code, _, err = _export(capsys, run, "--format", "onnx", "-o", out)
    assert code == 2 and "unknown format 'onnx'" in err
    _one_clear_line(err)

    other = write_spec(tmp_path / "r34.json", tiny_spec(tmp_path / "data", model__backbone="resnet34"))
    code, _, err = _export(capsys, run, "--spec", other, "-o", out)
    assert code == 2 and "resnet34" in err
    _one_clear_line(err)
    regnet = write_spec(
        tmp_path / "regnet.json", tiny_spec(tmp_path / "data", model__backbone="regnet_y_400mf")
    )
    torch.save(build_backbone("regnet_y_400mf")[0].state_dict(), tmp_path / "regnet.pt")
    code, _, err = _export(
        capsys, tmp_path / "regnet.pt", "--spec", regnet, "--format", "detectron2", "-o", out
    )
    assert code == 2 and "needs a ResNet" in err
    _one_clear_line(err)
    assert not out.exists()

    out.write_bytes(b"precious")
    code, _, err = _export(capsys, run, "-o", out)
    assert code == 2 and "--force" in err and out.read_bytes() == b"precious"
    _one_clear_line(err)
    assert _export(capsys, run, "-o", out, "--force")[0] == 0
    assert set(torch.load(out, weights_only=True)) == set(build_backbone("resnet18")[0].state_dict())
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left

    # --force replaces a file's contents through a link, never a FIFO or a device (-o /dev/stdout)
    link, null, fifo = tmp_path / "link.pt", tmp_path / "null.pt", tmp_path / "ff.pt"
    link.symlink_to(out.name)
    out.write_bytes(b"old")
    assert _export(capsys, run, "-o", link, "--force")[0] == 0
    assert link.is_symlink() and set(torch.load(out, weights_only=True)) == set(
        build_backbone("resnet18")[0].state_dict()
    )
    null.symlink_to(os.devnull)
    os.mkfifo(fifo)
    for path, kind in ((null, "a character device"), (fifo, "a FIFO")):
        code, _, err = _export(capsys, run, "-o", path, "--force")
        assert code == 2 and f"cannot write {path}: exists and is {kind}, not a regular file" in err, err
        _one_clear_line(err)
    assert os.readlink(null) == os.devnull and fifo.is_fifo()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
