"""One store of fila's cache: a folder of entries, each a safetensors file named by its key.

- Only fila's own files count: the folder carries fila's marker (a ``CACHEDIR.TAG``, which also
  keeps backup tools out) and an entry's name is its key, a SHA-256 in hex, with the store's suffix.
  Any other file, in this folder or beside it, is never listed, evicted nor cleared.
- Every entry carries a CRC-32 over all it holds (each array's name, dtype, shape and bytes, and the
  metadata) and is verified before use: a damaged entry is deleted and read as a miss.
- Writes go through :func:`fila_cli.atomic_files.atomic_path`; a reader sees a whole old entry, a
  whole new one or none. An entry that vanishes or is replaced while it is read is a miss.
- A write that fails (full disk, read-only or uncreatable folder) is reported to ``on_write_error``
  and leaves no file behind: the cache is an optimisation, never a reason to lose an answer.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from fila_cli.atomic_files import atomic_path, is_partial
from fila_cli.caches.budget import CacheBudget, CacheEntry, touch

# The Cache Directory Tagging Specification's marker (https://bford.info/cachedir/): fila's folders carry it.
MARKER_NAME = "CACHEDIR.TAG"
MARKER_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
               "# This file is a cache directory tag created by fila: it holds only entries fila wrote and can remove.\n")
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
CHECKSUM_KEY = "fila.crc32"
# safetensors writes a file through a temporary file of its own beside it (the tempfile crate's
# name): a kill during that write leaves one in fila's folder.
SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")
# Entries of the sharded stores live in sub-folders named by their key's first characters.
SHARD_CHARS = 2


@dataclass(frozen=True)
class StoreInfo:
    name: str
    path: Path
    entries: int
    bytes: int


@dataclass(frozen=True)
class Entry:
    arrays: dict[str, np.ndarray]
    metadata: dict[str, str]


def entry_checksum(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """CRC-32 over everything an entry holds but the checksum itself."""
    described = {"arrays": {name: [str(array.dtype), list(array.shape)] for name, array in arrays.items()},
                 "metadata": {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}}
    crc = zlib.crc32(json.dumps(described, sort_keys=True).encode())
    for name in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8), crc)
    return str(crc)


def check_key(key: str) -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"a cache key is a SHA-256 in hex (got {key!r})")
    return key


class EntryStore:
    """The entries of one store under ``directory``, named ``<key><suffix>`` (in ``<key[:2]>/`` when ``sharded``)."""

    def __init__(self, name: str, directory: Path, suffix: str, *, sharded: bool,
                 budget: CacheBudget | None = None, on_write_error: Callable[[Path, Exception], None] | None = None):
        self.name = name
        self.directory = Path(directory)
        self.suffix = suffix
        self.sharded = sharded
        self.budget = budget
        self.on_write_error = on_write_error
        self.writes_on = True  # off after a failed write: one warning, then the run goes on uncached

    def path(self, key: str) -> Path:
        check_key(key)
        folder = self.directory / key[:SHARD_CHARS] if self.sharded else self.directory
        return folder / f"{key}{self.suffix}"

    def is_marked(self) -> bool:
        return (self.directory / MARKER_NAME).is_file()

    # -- reading --

    def read(self, key: str) -> Entry | None:
        """The verified entry under ``key``; None when absent, damaged (then deleted) or replaced meanwhile."""
        path = self.path(key)
        try:
            before = os.stat(path)
        except OSError:
            return None
        try:
            with safe_open(str(path), framework="numpy") as handle:
                metadata = dict(handle.metadata() or {})
                arrays = {name: handle.get_tensor(name) for name in handle.keys()}
        except FileNotFoundError:
            return None  # removed by another process
        except (SafetensorError, OSError, ValueError):
            self._drop_if_unchanged(path, before)
            return None
        if metadata.get(CHECKSUM_KEY) != entry_checksum(arrays, metadata):
            self._drop_if_unchanged(path, before)
            return None
        with suppress(OSError):  # gone or read-only meanwhile: the entry read is whole and verified all the same
            touch(path)
        return Entry(arrays, metadata)

    def discard(self, key: str) -> None:
        with suppress(OSError):
            self.path(key).unlink(missing_ok=True)

    def _drop_if_unchanged(self, path: Path, before: os.stat_result) -> None:
        """Delete a damaged entry, unless another process has meanwhile written a new one in its place."""
        with suppress(OSError):
            now = os.stat(path)
            if (now.st_ino, now.st_mtime_ns, now.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size):
                path.unlink()

    # -- writing --

    def write(self, key: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bool:
        """Store the entry (atomically, with its checksum), then evict over the budget. False when it
        was not stored: writes are off after a failure, reported once to ``on_write_error``."""
        from safetensors.numpy import save_file

        if not self.writes_on:
            return False
        path = self.path(key)
        metadata = {**metadata, CHECKSUM_KEY: entry_checksum(arrays, metadata)}
        try:
            self._make_folder(path.parent)
            with atomic_path(path) as temporary:
                save_file(arrays, str(temporary), metadata=metadata)
            touch(path)
        except (OSError, SafetensorError) as error:  # safetensors reports a full disk as SafetensorError
            self.writes_on = False
            if self.on_write_error is not None:
                self.on_write_error(path, error)
            return False
        if self.budget is not None:
            self.budget.evict(keep=path)
        return True

    def _make_folder(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        marker = self.directory / MARKER_NAME
        if not marker.is_file():
            marker.write_text(MARKER_TEXT)

    # -- the store as a whole --

    def _entry_files(self) -> list[Path]:
        if not self.is_marked():
            return []  # not a folder fila made: nothing in it is fila's
        pattern = f"*/*{self.suffix}" if self.sharded else f"*{self.suffix}"
        return [path for path in self.directory.glob(pattern)
                if KEY_PATTERN.fullmatch(path.name.removesuffix(self.suffix))
                and (not self.sharded or path.parent.name == path.name[:SHARD_CHARS])]

    def entries(self) -> list[CacheEntry]:
        found = []
        for path in self._entry_files():
            try:
                stat = path.stat()
            except OSError:  # removed by another process meanwhile
                continue
            found.append(CacheEntry(path, stat.st_size, stat.st_mtime_ns))
        return found

    def leftovers(self) -> list[Path]:
        """Temporary files of writes a kill interrupted (or still under way in another process)."""
        if not self.is_marked():
            return []
        pattern = "*/*" if self.sharded else "*"
        return [path for path in self.directory.glob(pattern)
                if (is_partial(path) and KEY_PATTERN.match(path.name.lstrip("."))) or SAFETENSORS_TEMPORARY.fullmatch(path.name)]

    def info(self) -> StoreInfo:
        entries = self.entries()
        return StoreInfo(self.name, self.directory, len(entries), sum(entry.bytes for entry in entries))

    def clear(self) -> int:
        """Remove every entry and leftover temporary file; the number removed."""
        removed = 0
        for path in [*self._entry_files(), *self.leftovers()]:
            with suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed
