"""The tools' command lines: a usage error is one line and exit 2, as the ``pixpro`` CLI's own (argparse
prints its usage block and the error on three lines)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from schemas.contract import Exit, one_line


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(one_line(f"{self.prog}: {message} (see {self.prog} --help)"), file=sys.stderr)
        raise SystemExit(Exit.USAGE)


def say(line: str) -> None:
    """One line of at most 200 characters on stderr, the prefix (``pixpro export: error:``) included."""
    print(one_line(line), file=sys.stderr, flush=True)
