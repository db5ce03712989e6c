"""The result commands refuse what the login node can see is wrong at once: the tools they start import
torch before they check their arguments (seconds), and check again where it matters (an export's
create-only write)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import run_cli


def test_a_taken_export_output_or_an_unknown_format_is_refused_before_the_tool_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXPRO_HOME", str(tmp_path / "home"))
    out = tmp_path / "w.pt"
    out.write_bytes(b"precious")
    code, _, err = run_cli("export", str(tmp_path / "run"), "-o", str(out))
    assert (code, err) == (2, f"pixpro: output {out} already exists; pass --force to overwrite it\n")
    assert out.read_bytes() == b"precious"
    code, _, err = run_cli("export", str(tmp_path / "run"), "-o", str(out) + "2", "--format", "onnx")
    assert (code, err) == (2, "pixpro: unknown format 'onnx'; use one of torchvision, detectron2\n")


def test_a_missing_image_to_draw_is_refused_before_the_tool_starts(tmp_path: Path) -> None:
    image, out = tmp_path / "nope.jpg", tmp_path / "v.png"
    code, _, err = run_cli("viz", str(image), "-o", str(out))
    assert (code, err) == (3, f"pixpro: image {image} does not exist\n")
    assert not out.exists()
