"""The CLI owns the signals: Ctrl-C (SIGINT) and SIGTERM (what ``timeout``, systemd, Kubernetes and
Ray send) while a command runs.

- The first signal asks the run to stop (``StopRequest.requested``, the library's ``should_stop``):
  the record in flight is finished (or dropped) whole, the summary printed, and the command exits
  130 for Ctrl-C, 143 for SIGTERM.
- A second signal stops at once: ``Interrupted`` (a ``KeyboardInterrupt``) is raised where the run is. Records are
  written one whole line per system call, so the output file stays whole.
- ``immediate``: the first signal stops at once (``fila ask``: one answer, nothing to finish).

Only the main thread can install handlers; elsewhere (a test calling the CLI in a thread) nothing
is installed and the default behaviour stays.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from fila_cli.errors import ExitCode

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """What a signal raises to stop at once; ``except KeyboardInterrupt`` catches it as it catches Ctrl-C.

    Why not ``KeyboardInterrupt`` itself: when one is raised inside code run by ``exec`` of a string (a
    dataclass being created while a module imports, say), CPython marks it "unhandled" even after the CLI
    handled it, and ``python -m fila_cli`` then ends by killing itself with SIGINT instead of exiting 143.
    The mark is set only for ``KeyboardInterrupt`` exactly, never for a subclass.
    """


class StopRequest:
    """Set by the signals ``stop_signals`` installs; read by the run between records."""

    def __init__(self, immediate: bool = False):
        self.immediate = immediate
        self.signum: int | None = None  # the first signal received
        self.count = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
        _last_signal[0] = signum
        if self.immediate or self.count > 1:
            raise Interrupted

    def requested(self) -> bool:
        return self.signum is not None

    def reset(self) -> None:
        """Forget a request that was acted on (``fila chat``: one answer stopped, the session goes on)."""
        self.signum, self.count = None, 0

    @property
    def exit_code(self) -> int:
        return interrupted_exit_code(self.signum)


# The last signal any StopRequest saw: how ``handle_errors`` tells a SIGTERM's KeyboardInterrupt from Ctrl-C's.
_last_signal: list[int | None] = [None]


def interrupted_exit_code(signum: int | None = None) -> int:
    """130 after Ctrl-C, 143 after SIGTERM (128 + the signal's number, as shells report it)."""
    signum = _last_signal[0] if signum is None else signum
    return int(ExitCode.TERMINATED) if signum == signal.SIGTERM else int(ExitCode.INTERRUPTED)


@contextlib.contextmanager
def stop_signals(immediate: bool = False) -> Iterator[StopRequest]:
    """SIGINT and SIGTERM set the returned ``StopRequest`` while the block runs; the previous
    handlers come back after it."""
    request = StopRequest(immediate)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request) for signum in HANDLED}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
