"""Running the ``fila`` command in tests: in its own process, or in-process with typer's ``CliRunner``.

A subprocess is the real thing (its own interpreter, signals, pipes, exit status, what it imports) and
costs a Python start-up plus the imports (seconds under load). ``invoke`` runs the same typer app in the
test's process, for option checks and exit codes that need none of that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping

from typer.testing import CliRunner

# Seconds any one command may run before the test fails (a hang is a failure, not a stuck suite).
FILA_TIMEOUT_S = 600


def fila_argv(*args) -> list[str]:
    """The command line of ``fila ARGS...`` run by this interpreter (``python -m fila_cli``)."""
    return [sys.executable, "-m", "fila_cli", *map(str, args)]


def fila(*args, stdin: str | None = None, env: Mapping[str, str | None] | None = None, cwd=None,
         preexec_fn: Callable[[], None] | None = None, timeout: float = FILA_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``fila ARGS...`` in a new process; text stdout/stderr captured, never raises on its exit status.

    env: variables set over this process's environment (a ``None`` value removes the variable).
    """
    environment = None
    if env is not None:
        environment = dict(os.environ)
        for name, value in env.items():
            if value is None:
                environment.pop(name, None)
            else:
                environment[name] = value
    return subprocess.run(fila_argv(*args), input=stdin, capture_output=True, text=True, env=environment, cwd=cwd,
                          preexec_fn=preexec_fn, timeout=timeout)


def invoke(*args, stdin: str | None = None, env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run ``fila ARGS...`` in this process (typer's CliRunner): for options, usage errors and exit codes.

    Returns what :func:`fila` returns (returncode, stdout, stderr), so a test reads the same either way.
    env: variables set (``None``: removed) while the command runs, as :func:`fila` takes them.
    An exception fila did not turn into an exit status is raised here: in a process it would have been
    a traceback, which no test accepts.
    """
    from fila_cli.cli.app import app  # the CLI's import cost is paid by the tests that use it

    argv = [str(a) for a in args]
    result = CliRunner(env=env).invoke(app, argv, input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["fila", *argv], result.exit_code, result.stdout, result.stderr)
