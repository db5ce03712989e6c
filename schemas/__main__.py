"""Regenerate the exported JSON Schema: ``python -m schemas > schemas/run_spec.schema.json``,
``python -m schemas --write``, or ``python -m schemas --check`` (exit 1 if the file is stale, for CI)."""

from __future__ import annotations

import sys

from schemas.generated import generated_file_main
from schemas.spec.export import SCHEMA_PATH, json_schema_text


def main(argv: list[str] | None = None) -> int:
    return generated_file_main("python -m schemas", __doc__, SCHEMA_PATH, json_schema_text, argv)


if __name__ == "__main__":
    sys.exit(main())
