"""Errors the CLI turns into one line on stderr and a documented exit code (never a traceback)."""

from __future__ import annotations

from schemas.contract import Exit, one_line

EXIT_OK = Exit.OK
EXIT_FAILURE = Exit.FAILURE
EXIT_USAGE = Exit.USAGE
EXIT_NOT_FOUND = Exit.NOT_FOUND


class PixproError(Exception):
    """A problem the user can act on; ``str()`` is one line per problem, ``code`` the exit status."""

    code = EXIT_FAILURE

    def __init__(self, message: str | list[str]) -> None:
        lines = message if isinstance(message, list) else [message]
        self.lines = [one_line(line) for line in lines if str(line).strip()] or ["error"]
        super().__init__("\n".join(self.lines))


class UsageError(PixproError):
    """Bad options or an invalid spec: nothing was submitted or changed."""

    code = EXIT_USAGE


class NotFound(PixproError):
    """No run or job with that id."""

    code = EXIT_NOT_FOUND


class Failure(PixproError):
    """Anything else (cluster refused, storage unreachable, run still active...)."""

    code = EXIT_FAILURE


class Interrupted(PixproError):
    """Ctrl-C that came while something was queued and recorded: said once that is done, with what was
    left queued."""

    code = Exit.INTERRUPTED
