"""The result commands refuse what the login node can see is wrong at once: the tools they start import
torch before they check their arguments (seconds), and check again where it matters (an export's
create-only write)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cluster.cli import app
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
    typo = tmp_path / "wieghts" / "w.pt"
    code, _, err = run_cli("export", str(tmp_path / "run"), "-o", str(typo))
    assert (code, err) == (2, f"pixpro: output {typo}: its folder does not exist\n")
    assert not typo.parent.exists()  # not created


def test_a_missing_image_to_draw_is_refused_before_the_tool_starts(tmp_path: Path) -> None:
    image, out = tmp_path / "nope.jpg", tmp_path / "v.png"
    code, _, err = run_cli("viz", str(image), "-o", str(out))
    assert (code, err) == (3, f"pixpro: image {image} does not exist\n")
    assert not out.exists()


def test_a_taken_figure_output_or_an_out_of_range_value_is_refused_before_the_tool_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``plot`` and ``viz`` overwrite nothing without ``--force`` (``-o spec.json`` would have become a
    PNG); a seed beyond the spec's range (torch's generator overflows) is a usage error, not a traceback."""
    monkeypatch.setenv("PIXPRO_HOME", str(tmp_path / "home"))
    image, out = tmp_path / "a.jpg", tmp_path / "spec.json"
    image.write_bytes(b"not looked at")
    out.write_text("precious")
    for args in (["plot", str(tmp_path / "run")], ["viz", str(image)]):
        code, _, err = run_cli(*args, "-o", str(out))
        assert (code, err) == (2, f"pixpro: output {out} already exists; pass --force to overwrite it\n")
    assert out.read_text() == "precious"
    for args in (
        ["viz", str(image), "-o", str(tmp_path / "v.png"), "--seed", "9" * 23],
        ["eval", str(tmp_path / "run"), "--data", str(tmp_path), "--seed", "-1"],
    ):
        monkeypatch.setattr(sys, "argv", ["pixpro", *args])  # the console script's handling of usage errors
        with pytest.raises(SystemExit) as exited:
            app()
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1 and "'--seed'" in err, err
    code, _, err = run_cli("viz", str(tmp_path), "-o", str(tmp_path / "v.png"))
    assert (code, err) == (3, f"pixpro: image {tmp_path} is a folder\n")


def test_an_error_line_is_at_most_200_characters_prefix_included(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.exits import say
    from launch.tools.viz import main as viz_main

    far = str(tmp_path / ("y" * 100) / ("z" * 100) / ("w" * 100))
    say(f"run {far} is not there")
    assert viz_main(["plot", far, "-o", str(tmp_path / "c.png")]) == 3
    lines = capsys.readouterr().err.splitlines()
    assert [line[:12] for line in lines] == ["pixpro: run ", "pixpro plot:"]
    assert all(len(line) <= 200 for line in lines), [len(line) for line in lines]


@pytest.mark.timeout(120)
def test_an_output_that_is_not_a_regular_file_is_refused_at_once_even_with_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``export``/``plot -o X --force`` replace a file's contents, never a FIFO, a device (``-o
    /dev/stdout`` as root became a 44 MB file) or a dangling link with a file of their own."""
    import os

    monkeypatch.setenv("PIXPRO_HOME", str(tmp_path / "home"))
    fifo, null, dangling = tmp_path / "ff.png", tmp_path / "null.pt", tmp_path / "gone.pt"
    os.mkfifo(fifo)
    null.symlink_to(os.devnull)
    dangling.symlink_to(tmp_path / "nothing")
    for out, why in (
        (fifo, "exists and is a FIFO, not a regular file"),
        (null, "exists and is a character device, not a regular file"),
        (dangling, "is a symbolic link to nothing"),
    ):
        for command in ("export", "plot"):
            code, _, err = run_cli(command, str(tmp_path / "run"), "-o", str(out), "--force")
            assert (code, err) == (2, f"pixpro: cannot write {out}: {why}\n"), command
    assert fifo.is_fifo() and os.readlink(null) == os.devnull and dangling.is_symlink()


def test_atomic_write_follows_a_link_to_a_file_and_refuses_anything_else(tmp_path: Path) -> None:
    import os

    from schemas.contract import NotRegularFile, atomic_write

    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write(link, b"new")
    assert link.is_symlink() and target.read_text() == "new"
    with pytest.raises(FileExistsError):
        atomic_write(link, b"newer", exclusive=True)
    assert target.read_text() == "new"
    atomic_write(tmp_path / "sub" / "fresh", b"x", exclusive=True, mode=0o666)
    assert (tmp_path / "sub" / "fresh").read_bytes() == b"x"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    for path in (fifo, tmp_path / "dir"):
        with pytest.raises(NotRegularFile):
            atomic_write(path, b"x")
    assert fifo.is_fifo() and (tmp_path / "dir").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo", "link.json", "real.json", "sub"]
