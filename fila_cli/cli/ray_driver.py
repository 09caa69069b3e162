"""`fila batch --ray` runs its Ray driver in a child process, supervised by the command's own.

Why: when the node's agent (the raylet) dies, Ray's core worker ends the driver process from C++
(exit 1, no Python exception, no handler runs), so nothing inside that process can say what
happened. The parent outlives it and reports a lost cluster as one line: the failure, how many
records were not written, and the ``--resume`` command that finishes the job.

- The child is in its own process group and the parent forwards SIGINT and SIGTERM to it, once
  each, so Ctrl-C keeps its meaning (first: finish the records in flight; second: stop at once).
- The child dies with the parent (``PR_SET_PDEATHSIG`` on Linux; a watcher thread elsewhere): a
  ``kill -9`` on the command leaves no driver writing behind it, and ``--resume`` finishes the job.
- The two share three counters in shared memory: the records this run owes, those written, and
  whether the child ended through fila's own exit path (a summary or a one-line error printed).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fila_cli.cli.stopping import HANDLED
from fila_cli.errors import ExitCode

UNKNOWN = -1  # the total, before the driver has hashed the documents
PARENT_WATCH_S = 0.5  # how often the child checks, where prctl is missing, that its parent is alive


@dataclass
class DriverStatus:
    """Counters the child writes and the parent reads, in shared memory (they survive the child)."""

    total: Any  # multiprocessing.Value("q"): records this run owes, UNKNOWN until known
    written: Any  # multiprocessing.Value("q")
    reported: Any  # multiprocessing.Value("b"): 1 once the child ends through fila's exit path

    @classmethod
    def create(cls, context) -> DriverStatus:
        return cls(context.Value("q", UNKNOWN, lock=False), context.Value("q", 0, lock=False),
                   context.Value("b", 0, lock=False))

    def missing(self) -> int:
        """Records owed and not written: UNKNOWN until the total is known."""
        return self.total.value - self.written.value if self.total.value != UNKNOWN else UNKNOWN


def supervise(run: Callable[[DriverStatus], int], lost_line: Callable[[int, int, str], str]) -> int:
    """Run ``run(status)`` in a child process and return its exit code. When the child ends
    without reporting (ended by Ray, or killed), print ``lost_line(missing, total, how)`` as the
    command's one error line and return 1."""
    from fila_cli.cli.support import error_line, stderr

    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    status = DriverStatus.create(context)
    child = context.Process(target=_child_main, args=(run, status, os.getpid()), name="fila-ray-driver")
    with _forwarding_signals(lambda: child.pid):
        child.start()
        child.join()
    if status.reported.value:
        return child.exitcode if child.exitcode is not None else int(ExitCode.FAILURE)
    if stderr.is_terminal:
        stderr.show_cursor(True)  # the child's progress bar hid it and never came back
    error_line(lost_line(status.missing(), status.total.value, _how_it_ended(child.exitcode)))
    return int(ExitCode.FAILURE)


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"the driver process was killed by {signal.Signals(-exitcode).name}"
    return f"the driver process exited with status {exitcode} before the batch finished"


@contextlib.contextmanager
def _forwarding_signals(child_pid: Callable[[], int | None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to the child (in its own group, it hears the terminal only through us)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: object) -> None:
        pid = child_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _child_main(run: Callable[[DriverStatus], int], status: DriverStatus, parent_pid: int) -> None:
    os.setpgrp()  # the terminal's Ctrl-C reaches the parent only, which forwards it once
    _die_with_parent(parent_pid)
    code = int(ExitCode.FAILURE)
    try:
        code = run(status)
    finally:
        status.reported.value = 1
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the parent dies, so a killed command leaves no driver behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os._exit(int(ExitCode.FAILURE))
                return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_WATCH_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="fila-parent-watch", daemon=True).start()
