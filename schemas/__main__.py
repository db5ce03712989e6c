"""Regenerate the exported JSON Schema: ``python -m schemas > schemas/run_spec.schema.json``,
``python -m schemas --write``, or ``python -m schemas --check`` (exit 1 if the file is stale, for CI)."""

from __future__ import annotations

import argparse
import sys

from schemas.spec.export import SCHEMA_PATH, json_schema_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {SCHEMA_PATH.name} in the package")
    mode.add_argument("--check", action="store_true", help="exit 1 if the exported schema is out of date")
    args = parser.parse_args(argv)
    text = json_schema_text()
    if args.write:
        SCHEMA_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
        return 0
    if args.check:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.is_file() else None
        if current != text:
            print(f"{SCHEMA_PATH} is out of date; run: python -m schemas --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
