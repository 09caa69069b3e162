"""What every command shares: one-line errors with documented exit codes, stderr console."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fila_cli.errors import ExitCode, FilaError, UsageError

# Logs, progress and errors go to stderr; stdout carries only results (JSON when piped). A script
# reading stderr gets each line whole: wrapped to the width only on a terminal.
stderr = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())

EXIT_CODES_HELP = (
    "Exit codes: 0 answered/done; 1 anything else (some batch records failed, or a bug); 2 usage; "
    "3 the input document is missing, unreadable, encrypted without the right password, or has no such page; "
    "4 the model or weights are missing, incompatible or corrupt, or the input is past the model's limits "
    "(a page whose tokens do not fit its context); 130 interrupted (Ctrl-C); 141 stdout closed by its reader "
    "(`| head`), quietly, as Unix tools; 143 terminated (SIGTERM)."
)

FILE_HELP = "A PDF, or an image (PNG, JPEG, WebP, TIFF)."

VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's log and full tracebacks.")]
# For the commands that run no LLM.
QuietVerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show full tracebacks.")]


def error_line(message: str) -> None:
    # Plain print, not Rich: a message is user data (file names may contain "[...]") and must stay one line.
    print(f"fila: error: {message}", file=sys.stderr, flush=True)


def warning_line(message: str) -> None:
    """``fila: warning: ...`` on stderr: the answer came, but the user should know this."""
    print(f"fila: warning: {message}", file=sys.stderr, flush=True)


def note_line(message: str) -> None:
    """``fila: note: ...`` on stderr: something about the answer worth knowing (the crop-boundary notice)."""
    print(f"fila: note: {message}", file=sys.stderr, flush=True)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: Python's final flush of a closed pipe would print an error."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@contextlib.contextmanager
def handle_errors(verbose: bool = False) -> Iterator[None]:
    """Turn every failure into one line on stderr and its exit code; a traceback only if verbose."""
    try:
        yield
    except typer.Exit:
        raise
    except FilaError as error:
        if verbose:
            traceback.print_exc()
        error_line(str(error))
        raise typer.Exit(int(error.exit_code)) from None
    except BrokenPipeError:  # `fila batch ... | head -1`: the reader has what it wanted
        _quiet_stdout()
        raise typer.Exit(int(ExitCode.BROKEN_PIPE)) from None
    except KeyboardInterrupt:  # Ctrl-C, or a second signal (cli/stopping.py): SIGTERM exits 143
        from fila_cli.cli.stopping import interrupted_exit_code

        error_line("interrupted")
        raise typer.Exit(interrupted_exit_code()) from None
    except Exception as error:  # a bug: say so briefly, details on request
        if verbose:
            traceback.print_exc()
        error_line(f"unexpected {type(error).__name__}: {error} (rerun with --verbose for the traceback, and please report it)")
        raise typer.Exit(int(ExitCode.FAILURE)) from None


def check_resumable_output(output: Path | None, resume: bool, holds: str) -> None:
    """The output rules of the commands that write one record per unit and continue with --resume
    (``holds``: what the file holds, "records" or "predictions")."""
    from fila_cli.atomic_files import check_output_folder

    if resume and output is None:
        raise UsageError(f"--resume needs --output FILE: the {holds} to continue")
    if output is not None:
        check_output_folder(output)
    if output is not None and not resume and output.exists() and output.stat().st_size > 0:
        raise UsageError(f"{output} already holds {holds}: pass --resume to continue it, or choose another file")
