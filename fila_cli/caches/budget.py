"""One size cap over everything fila caches on disk: least recently used entries go first.

Which entry is worth keeping does not depend on its store, so one budget covers the visual tokens
and the LLM prefix states: after each write, the least recently used entries of either store are
removed until they fit ``--cache-max-gb``.

- Use is the entry's modification time, set with a nanosecond clock on every write and every hit
  (:func:`touch`); a file system's own timestamps may tick too coarsely to order quick successive uses.
- Entries are the stores' own (``EntryStore.entries``: fila's names in fila's folders); nothing else
  in the cache folder is counted or removed, nor a temporary file another process is writing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    """The cap on the entries that ``sources`` list (the stores of one cache folder)."""

    sources: Sequence[Callable[[], list[CacheEntry]]]
    max_bytes: int = int(DEFAULT_CACHE_MAX_GB * BYTES_PER_GB)

    def entries(self) -> list[CacheEntry]:
        """Every finished entry of every store, least recently used first."""
        found = [entry for source in self.sources for entry in source()]
        return sorted(found, key=lambda entry: entry.last_used_ns)

    def used_bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries())

    def fits(self, n_bytes: int) -> bool:
        """Whether one entry of ``n_bytes`` can be kept at all (a larger one would evict everything for nothing)."""
        return n_bytes <= self.max_bytes

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used entries until the total fits the cap; ``keep`` (the entry
        just written) stays. An entry that cannot be removed is passed over. Returns the removed paths."""
        entries = self.entries()
        total = sum(entry.bytes for entry in entries)
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and entry.path == keep:
                continue
            try:
                entry.path.unlink(missing_ok=True)
            except OSError:  # a read-only folder: the cap is exceeded rather than the answer lost
                continue
            total -= entry.bytes
            removed.append(entry.path)
        return removed
