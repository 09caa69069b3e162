"""One size cap over everything fila caches on disk: least recently used entries go first.

fila keeps two stores under one folder (``$FILA_CACHE_DIR``, else ``~/.cache/fila/tokens``): the
visual tokens of pages already encoded (``vision/token_cache.py``, ~20 MB a page) and, in its
``llm-prefix`` sub-folder, the LLM states after pages already read (``llm/prefix_store.py``, up to
a GB a page for a 7B model). Which entry is worth keeping does not depend on its store, so one
budget covers both: after each write, the least recently used entries of either store are removed
until the folder fits ``--cache-max-gb``.

- Use is the entry's modification time, set with a nanosecond clock on every write and every hit
  (:func:`touch`); a file system's own timestamps may tick too coarsely to order quick successive uses.
- Entries are the stores' finished files (their suffixes below); a ``.partial`` file being written
  by another process is never counted nor removed here (``fila cache clear`` removes leftovers).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

# The stores' entry files: visual tokens, LLM prefix states.
ENTRY_SUFFIXES = (".safetensors", ".llstate")
# A laptop's disk holds it easily; enough for a few 7B page states and a hundred pages of tokens.
DEFAULT_CACHE_MAX_GB = 4.0
BYTES_PER_GB = 1024**3


def touch(path: Path) -> None:
    """Mark ``path`` most recently used (now, to the nanosecond)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    bytes: int
    last_used_ns: int


@dataclass
class CacheBudget:
    """The cap on the entries under ``root`` (both stores when ``root`` is fila's cache folder)."""

    root: Path
    max_bytes: int = int(DEFAULT_CACHE_MAX_GB * BYTES_PER_GB)

    def entries(self) -> list[CacheEntry]:
        """Every finished entry under ``root``, least recently used first."""
        if not self.root.exists():
            return []
        found = []
        for path in self.root.rglob("*"):
            if path.suffix not in ENTRY_SUFFIXES:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            found.append(CacheEntry(path, stat.st_size, stat.st_mtime_ns))
        return sorted(found, key=lambda entry: entry.last_used_ns)

    def used_bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries())

    def fits(self, n_bytes: int) -> bool:
        """Whether one entry of ``n_bytes`` can be kept at all (a larger one would evict everything for nothing)."""
        return n_bytes <= self.max_bytes

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used entries until the total fits the cap; ``keep`` (the entry
        just written) stays. Returns the removed paths."""
        entries = self.entries()
        total = sum(entry.bytes for entry in entries)
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and entry.path == keep:
                continue
            entry.path.unlink(missing_ok=True)
            total -= entry.bytes
            removed.append(entry.path)
        return removed
