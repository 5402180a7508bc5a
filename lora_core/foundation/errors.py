"""The project's error taxonomy: which failures the user fixes, which a run cannot get past, which are ours.

Every error the library raises on purpose derives from one of two bases, and
both the retry policy (`tasks.retries`) and the command line (`flows.cli`)
decide from the base alone, so they cannot disagree:

- `UserError`: bad input, an unreachable model, a bad setting. Running again
  cannot help; the message says what to change. Never retried; the CLI prints
  the message (no traceback) and exits 2.
- `RunFailure`: the run as configured cannot go on, and repeating the same
  step from the same saved state repeats it (a NaN loss, NaN weights). Never
  retried; the CLI prints the message and exits 1.

Anything else is either transient (I/O, out of memory: retried) or a bug (a
traceback, on purpose).
"""

from __future__ import annotations

__all__ = ["DAMAGED_FILE_ERRORS", "EXIT_RUN_FAILURE", "EXIT_USER_ERROR", "RunFailure", "UserError", "exit_code"]

EXIT_USER_ERROR = 2
EXIT_RUN_FAILURE = 1


class UserError(Exception):
    """Bad input, an unreachable model or a bad setting: the message names the file or field and the fix."""


class RunFailure(Exception):
    """The run cannot go on as configured, and running the same step again would fail the same way."""


# What reading a damaged, truncated or foreign file raises: missing or unreadable (OSError), bad bytes,
# text, JSON or numbers (ValueError, which covers the JSON, CSV-parser and Unicode errors), a missing
# key or column (KeyError), a table failing its schema (pandera), a bad safetensors header. Nothing
# else: a check that a stage's files are whole must let a bug surface, not turn it into a silent re-run.
# Built on first use (PEP 562): pandera takes a second to import, and the command line answers `--help`
# and a bad path without it.
DAMAGED_FILE_ERRORS: tuple[type[Exception], ...]  # declared here, built by `__getattr__`


def __getattr__(name: str) -> tuple[type[Exception], ...]:
    if name != "DAMAGED_FILE_ERRORS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from pandera.errors import SchemaError, SchemaErrors
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, SchemaError, SchemaErrors, SafetensorError)


def exit_code(error: BaseException) -> int | None:
    """The command line's exit status for `error`; None for one it does not explain (a traceback follows)."""
    if isinstance(error, UserError):
        return EXIT_USER_ERROR
    if isinstance(error, RunFailure):
        return EXIT_RUN_FAILURE
    return None
