"""``fila ask --keep-alive DURATION``: the first ask starts a background server, later asks use it.

The server listens on a Unix socket in a per-user folder (``$XDG_RUNTIME_DIR/fila``, else
``/tmp/fila-UID``, 0700), named after the model options it loaded, and exits after DURATION
without a request (``fila serve --idle-exit``). Its log is beside the socket (``.log``).

- A later ask with the same model options finds the socket and asks through it: no model load.
- A socket nothing answers on (its server was killed) is removed and a new server started.
- Two asks starting at once start one server: the start is under a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fila_cli.errors import ExitCode, FilaError, ModelError, UsageError, error_from_kind

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# How long a started server may take to load its model and answer /health.
STARTUP_TIMEOUT_S = 600.0
_POLL_S = 0.2
_LOG_TAIL_LINES = 5
_ERROR_PREFIX = "fila: error: "
_KIND_BY_EXIT_CODE = {ExitCode.USAGE: "usage", ExitCode.DOCUMENT: "document", ExitCode.MODEL: "model"}


def parse_duration(text: str, option: str = "--keep-alive") -> float:
    """Seconds in ``text``: 300, 30s, 5m, 1.5h, 1d (ollama's forms)."""
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise UsageError(f"{option} {text!r}: give a positive duration such as 30s, 5m or 1h")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def runtime_dir() -> Path:
    """This user's folder for keep-alive sockets, created 0700 and checked to be this user's."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "fila" if base else Path(tempfile.gettempdir()) / f"fila-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UsageError(f"{folder}: not this user's private folder (owner {info.st_uid}, mode {oct(info.st_mode & 0o777)}); "
                         "remove it or set XDG_RUNTIME_DIR")
    return folder


def socket_path_for(server_args: list[str]) -> Path:
    """The socket of the server started with ``server_args`` (the model options): one per model."""
    digest = hashlib.sha256(json.dumps(server_args).encode()).hexdigest()[:16]
    return runtime_dir() / f"serve-{digest}.sock"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_server(server_args: list[str], keep_alive_s: float) -> str:
    """The URL of a running server for ``server_args`` (started in the background if none answers)."""
    from fila_cli.serve.client import ServerClient
    from fila_cli.serve.listen import socket_answers

    socket_path = socket_path_for(server_args)
    url = f"unix:{socket_path}"
    with _locked(socket_path.with_suffix(".lock")):
        if socket_answers(socket_path):
            try:
                ServerClient(url).health()
                return url
            except Exception:  # not a fila server we can talk to: start ours in its place
                pass
        socket_path.unlink(missing_ok=True)  # stale: its server was killed
        log = socket_path.with_suffix(".log")
        command = [sys.executable, "-m", "fila_cli", "serve", "--socket", str(socket_path),
                   "--idle-exit", f"{keep_alive_s:g}s", *server_args]
        with open(log, "wb") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                       start_new_session=True, close_fds=True)
        _wait_until_ready(process, url, log)
    return url


def _startup_failure(code: int, log: Path) -> FilaError:
    """The server's own error (``fila: error: ...`` in its log, its exit code's kind): what a local
    ``fila ask`` would have said about the same model options."""
    lines = log.read_text(errors="replace").strip().splitlines()
    said = [line.removeprefix(_ERROR_PREFIX) for line in lines if line.startswith(_ERROR_PREFIX)]
    if said:
        return error_from_kind(_KIND_BY_EXIT_CODE.get(code, "error"), said[-1])
    tail = " | ".join(lines[-_LOG_TAIL_LINES:])
    return ModelError(f"the keep-alive server exited (code {code}) before it was ready: {tail} (log: {log})")


def _wait_until_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    from fila_cli.serve.client import ServerClient

    client = ServerClient(url)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _startup_failure(process.returncode, log)
        try:
            client.health()
            return
        except Exception:
            time.sleep(_POLL_S)
    process.terminate()
    raise ModelError(f"the keep-alive server did not answer within {STARTUP_TIMEOUT_S:g} s (log: {log})")
