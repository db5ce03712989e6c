"""The command line of a generated package file (the JSON Schema, the backbone table): print it, write
it, or check that the committed copy is current (exit 1 when stale, for CI)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from schemas.contract import Exit


def generated_file_main(
    prog: str, description: str | None, path: Path, text: Callable[[], str], argv: list[str] | None = None
) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {path.name} in the package")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {path.name} is out of date")
    args = parser.parse_args(argv)
    current_text = text()
    if args.write:
        path.write_text(current_text, encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
        return Exit.OK
    if args.check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != current_text:
            print(f"{path} is out of date; run: {prog} --write", file=sys.stderr)
            return Exit.FAILURE
        return Exit.OK
    sys.stdout.write(current_text)
    return Exit.OK
