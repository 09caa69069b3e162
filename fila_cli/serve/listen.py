"""The server's listening socket: loopback TCP, or a Unix socket only its user can open.

The command binds the socket itself and hands it to uvicorn: a port in use fails before the model
loads, ``--port 0`` can say which port it got, and a Unix socket is created 0600 (uvicorn's own
would be 0666).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

from fila_cli.errors import UsageError

_BACKLOG = 128


def bind_tcp(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=_BACKLOG, reuse_port=False)
    except OSError as error:
        hint = "; choose another --port" if error.errno == errno.EADDRINUSE else ""
        raise UsageError(f"cannot listen on {host}:{port} ({error.strerror or error}){hint}") from None


def socket_answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def remove_stale_socket(path: Path) -> None:
    """Remove ``path`` if it is a socket nothing listens on (its server was killed); a live one, or
    a file that is not a socket, is the user's to deal with."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket; choose another --socket path")
    if socket_answers(path):
        raise UsageError(f"{path}: another server already listens there; stop it, or choose another --socket path")
    path.unlink(missing_ok=True)


def bind_unix(path: Path) -> socket.socket:
    remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)  # created 0600: no moment where another user could connect
    try:
        listener.bind(str(path))
    except OSError as error:
        listener.close()
        raise UsageError(f"cannot listen on {path} ({error.strerror or error}); check the folder") from None
    finally:
        os.umask(previous)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)
    listener.listen(_BACKLOG)
    return listener


def url_of(listener: socket.socket) -> str:
    """The URL a client gives ``--server`` for ``listener``."""
    if listener.family == socket.AF_UNIX:
        return f"unix:{listener.getsockname()}"
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
