"""fila's cache folder: where it is, what lies in it, one cap over it, ``info`` and ``clear``.

The folder is ``$FILA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fila``, else ``~/.cache/fila``. It holds
one sub-folder per store, side by side::

    tokens/ab/<key>.safetensors    visual tokens of a page already encoded (vision/token_cache.py)
    llm-prefix/<key>.llstate       LLM state after a page already read (llm/prefix_store.py)

Each store folder carries fila's ``CACHEDIR.TAG``; fila lists, evicts and clears only the entries
it names there (see ``entries.py``), so a folder shared with anything else loses nothing else.

Before this layout (fila 0.1 development builds) the tokens lay in the folder itself and the prefix
states in ``<folder>/llm-prefix``, with the default folder ``~/.cache/fila/tokens``. Those entries
are not migrated: their format changed (no checksum over all they hold), so they would never be
read again. They are recomputed on use, and ``fila cache clear`` removes the old files.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fila_cli.caches.budget import BYTES_PER_GB, DEFAULT_CACHE_MAX_GB, CacheBudget
from fila_cli.caches.entries import KEY_PATTERN, SHARD_CHARS, EntryStore, StoreInfo

CACHE_DIR_ENV = "FILA_CACHE_DIR"
TOKENS_DIR = "tokens"
PREFIX_DIR = "llm-prefix"
TOKENS_SUFFIX = ".safetensors"
PREFIX_SUFFIX = ".llstate"

log = logging.getLogger(__name__)

V = TypeVar("V")


class KeyedCache(Protocol[V]):
    """What the visual-token cache, the prefix store and eval's in-memory pages share: a value by
    its key, or None; a failed or refused ``put`` is silent (the store warns once on its own)."""

    def get(self, key: str) -> V | None: ...

    def put(self, key: str, value: V) -> None: ...

    def discard(self, key: str) -> None: ...


def default_cache_root() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fila"


@dataclass(frozen=True)
class FolderInfo:
    root: Path
    stores: list[StoreInfo]

    @property
    def bytes(self) -> int:
        return sum(store.bytes for store in self.stores)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.root), "bytes": self.bytes, "default_max_bytes": int(DEFAULT_CACHE_MAX_GB * BYTES_PER_GB),
                "stores": [{"name": s.name, "path": str(s.path), "entries": s.entries, "bytes": s.bytes} for s in self.stores]}


class CacheFolder:
    """fila's cache folder (``root``, default :func:`default_cache_root`) under one cap of ``max_bytes``."""

    def __init__(self, root: Path | None = None, max_bytes: int = int(DEFAULT_CACHE_MAX_GB * BYTES_PER_GB)):
        self.root = Path(root) if root is not None else default_cache_root()
        self.tokens = EntryStore(TOKENS_DIR, self.root / TOKENS_DIR, TOKENS_SUFFIX, sharded=True,
                                 on_write_error=self._write_failed)
        self.llm_prefix = EntryStore(PREFIX_DIR, self.root / PREFIX_DIR, PREFIX_SUFFIX, sharded=False,
                                     on_write_error=self._write_failed)
        self.budget = CacheBudget([store.entries for store in self.stores], max_bytes)
        self._warned = False
        for store in self.stores:
            store.budget = self.budget

    @property
    def stores(self) -> tuple[EntryStore, EntryStore]:
        return self.tokens, self.llm_prefix

    def _write_failed(self, path: Path, error: Exception) -> None:
        """Warn once, and write no more in this run: a full disk would fail every page again, slowly."""
        if self._warned:
            return
        self._warned = True
        for store in self.stores:
            store.writes_on = False
        log.warning("fila: warning: cannot write the cache in %s (%s); answering without caching for the rest "
                    "of this run. Free some space, make the folder writable, point %s elsewhere, or pass --no-cache",
                    self.root, _reason(error), CACHE_DIR_ENV)

    def info(self) -> FolderInfo:
        return FolderInfo(self.root, [store.info() for store in self.stores])

    def clear(self) -> dict[str, int]:
        """Remove every entry fila wrote here (and a kill's leftover temporary files): the number per store."""
        removed = {store.name: store.clear() for store in self.stores}
        removed["old layout"] = self._clear_old_layout()
        return removed

    def _clear_old_layout(self) -> int:
        removed = 0
        for path in self._old_layout_files():
            with suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed

    def _old_layout_files(self) -> list[Path]:
        """Entries (and leftovers) of the layout before this one: tokens in ``<root>/ab/``, states in
        ``<old tokens root>/llm-prefix/``, recognised by their names (a key, fila's suffixes)."""
        name = re.compile(rf"\.?({KEY_PATTERN.pattern})(\{TOKENS_SUFFIX}|\{PREFIX_SUFFIX})(\.\d+\.partial)?")
        found = []
        for path in self.root.glob("*/*"):
            match = name.fullmatch(path.name)
            if match is not None and match[2] == TOKENS_SUFFIX and path.parent.name == match[1][:SHARD_CHARS]:
                found.append(path)
        for path in (self.root / TOKENS_DIR / PREFIX_DIR).glob("*"):
            match = name.fullmatch(path.name)
            if match is not None and match[2] == PREFIX_SUFFIX:
                found.append(path)
        return found


def _reason(error: Exception) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    said = re.search(r"I/O error: (.+?) \(os error \d+\)", str(error))  # safetensors' I/O error
    return said[1] if said else str(error)
