"""Writing a file so that a reader, a crash or a kill finds the old file or the new one, never half of one.

The bytes go to a temporary file in the destination's folder, created exclusively by
``tempfile.mkstemp`` (an unpredictable name opened with ``O_EXCL``: neither another process's write
nor a symlink planted under a guessed name is ever written through). The file is fsync'd and renamed
over the destination (a rename replaces a symlink there instead of following it), then the folder is
fsync'd so that the rename itself survives a power cut. On any failure the temporary file is removed.

Two forms: :func:`atomic_write` hands an open binary file; :func:`atomic_path` hands the temporary
file's name, for writers that take a name (safetensors, GGUF, llama.cpp's quantiser), and refuses
to publish it if the name has become a symlink.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

# Temporary files end so: ``fila cache clear`` recognises a kill's leftovers in its folders.
PARTIAL_SUFFIX = ".partial"
# What a process's umask leaves of a new file's permissions when /proc does not say.
_FALLBACK_UMASK = 0o022


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_write(path) as handle: handle.write(data)``: ``path`` holds all of it, or is untouched."""
    path = Path(path)
    with _temporary_beside(path) as (fd, temporary):
        with os.fdopen(fd, "wb", closefd=False) as handle:
            yield handle
        _publish(temporary, path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(path) as temporary: writer.save(temporary)``: for writers that open a file by name."""
    path = Path(path)
    with _temporary_beside(path) as (_fd, temporary):
        yield temporary
        _publish(temporary, path)


def write_bytes_atomically(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(data)


def is_partial(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write` (or of fila before it)."""
    return path.name.endswith(PARTIAL_SUFFIX)


@contextmanager
def _temporary_beside(path: Path) -> Iterator[tuple[int, Path]]:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    temporary = Path(name)
    try:
        yield fd, temporary
    except BaseException:
        with suppress(OSError):
            temporary.unlink()
        raise
    finally:
        os.close(fd)


def _publish(temporary: Path, path: Path) -> None:
    """fsync the file, give it the permissions a plain ``open`` would, rename it over ``path``, fsync the folder.

    A writer that takes a name may itself replace the file (safetensors writes a temporary file of
    its own and renames it over the name it is given): the file is reopened, refusing a symlink."""
    fd = os.open(temporary, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{temporary}: not a regular file once written")
        os.fchmod(fd, _mode_for(path))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _mode_for(path: Path) -> int:
    """The destination's permissions when it exists, else what ``open`` would give a new file."""
    with suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    # os.umask can only be read by setting it, which races with other threads: /proc says it (Linux 4.7+).
    with suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return _FALLBACK_UMASK


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform without folder handles (Windows): the rename is as durable as it gets
    try:
        with suppress(OSError):  # some file systems refuse fsync on a folder
            os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(path: str | Path, *, is_folder: bool = False) -> Path:
    """The rule for every path fila writes (``-o``, ``fila sample``, ``/save``, ``train --out``...):
    its folder must exist; fila creates no folder but a training run's own. A missing or unwritable
    folder is a usage error, one line before any slow work, never a traceback. ``is_folder``: the
    output is itself a folder (a training run's), created if missing."""
    from fila_cli.errors import UsageError

    path = Path(path)
    if path.is_dir() and not is_folder:
        raise UsageError(f"{path}: is a folder; name the file to write")
    folder = path.parent
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"{path}: the folder {folder} {state}; create it or check the path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot write into {folder} (permission denied); check the folder")
    return path
