"""Errors a user can act on, each tied to a documented exit code.

Every failure that reaches the CLI is one of these: the CLI prints ``str(error)`` as one line on
stderr and exits with ``error.exit_code``. Anything else is a bug (exit 1, traceback only with
``--verbose``).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # anything else (a bug, or some records of a batch failed)
    USAGE = 2  # bad command line
    DOCUMENT = 3  # input missing, unreadable, encrypted without the right password, no such page
    MODEL = 4  # model or weights missing, incompatible or corrupt; or the input past the model's limits
    INTERRUPTED = 130  # Ctrl-C
    BROKEN_PIPE = 141  # stdout's reader went away (`fila batch ... | head -1`): 128 + SIGPIPE, as Unix tools
    TERMINATED = 143  # SIGTERM (timeout, systemd, Kubernetes, Ray)


class FilaError(Exception):
    """Base class: a one-line, user-facing message and an exit code."""

    exit_code: ExitCode = ExitCode.FAILURE
    kind: str = "error"

    def __init__(self, message: str):
        # One line, always: the CLI prints it verbatim.
        super().__init__(" ".join(str(message).split()))


class UsageError(FilaError):
    exit_code = ExitCode.USAGE
    kind = "usage"


class DocumentError(FilaError):
    """The input document is missing, unreadable, encrypted, empty or has no such page."""

    exit_code = ExitCode.DOCUMENT
    kind = "document"


class ModelError(FilaError):
    """Model or weights are missing, incompatible or corrupt, or the input is past the model's limits
    (a page whose tokens do not fit its context)."""

    exit_code = ExitCode.MODEL
    kind = "model"


# Error kind (as recorded by ``fila batch`` and sent by the document worker) -> its class.
_ERROR_CLASSES: dict[str, type[FilaError]] = {cls.kind: cls for cls in (UsageError, DocumentError, ModelError)}


def error_from_kind(kind: str, message: str) -> FilaError:
    """The error a ``kind`` names (``FilaError`` for an unknown one): how an error crosses a process boundary."""
    return _ERROR_CLASSES.get(kind, FilaError)(message)
