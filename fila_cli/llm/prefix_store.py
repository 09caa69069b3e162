"""LLM prefix states on disk: a second question about a page loads the page instead of prefilling it.

Prefilling [prompt start, page] costs one forward pass over ~2,300 visual tokens: tens of seconds
for a 7B model on a CPU. llama.cpp can export the state it leaves (the KV cache and the last
logits, ``llama_state_get_data``); this store keeps that export on disk so that a later ``fila ask``
or ``fila chat`` about the same page restores it in about the time it takes to read the file.

- Key: the caller's string, built by :func:`prefix_cache_key` from the LLM file's identity, the
  context size, the visual tokens' cache keys (document, page, render settings, vision weights)
  and the prompt text around them (the template and system prompt).
- Entries are safetensors files (the state bytes, the prompt's token ids) with a CRC-32 of the
  state in their metadata: a damaged or truncated entry is deleted and recomputed, never loaded.
- Writes go to a temporary file renamed into place: a kill leaves the old entry or the new one.
- LRU by size, one cap for all of fila's cache (``disk_cache.CacheBudget``): a hit refreshes the
  entry's modification time; after each write the least recently used entries, prefix states or
  visual tokens, are removed until the cache folder fits ``--cache-max-gb``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fila_cli.disk_cache import CacheBudget, touch

if TYPE_CHECKING:  # llama.cpp loads only when a state is restored
    from fila_cli.llm.backend import LlamaBackend, PrefixState

# Bump when what a state holds, or how the prompt before the question is built, changes.
# 2: the key holds the attention kernel (flash attention lays the KV cache out otherwise).
PREFIX_FORMAT_VERSION = 2
STATE_SUFFIX = ".llstate"
# The store lives beside the visual tokens, in this sub-folder of the token cache.
PREFIX_DIR_NAME = "llm-prefix"
_STATE = "llama_state"
_INPUT_IDS = "input_ids"


def prefix_cache_key(llm_identity: str, n_ctx: int, visual_keys: list[str], prompt_texts: list[str], *,
                     flash_attn: bool = True, n_seq_max: int = 1) -> str:
    """Everything the state after [texts and pages] depends on, hashed: llama.cpp refuses a state
    saved by a context of another size, attention kernel or number of sequences."""
    settings = {"version": PREFIX_FORMAT_VERSION, "llm": llm_identity, "n_ctx": n_ctx, "visual": visual_keys,
                "texts": prompt_texts, "flash_attn": flash_attn}
    if n_seq_max > 1:  # a context for several sequences (fila batch --parallel); one: the keys as before
        settings["n_seq_max"] = n_seq_max
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class StoreInfo:
    path: Path
    entries: int
    bytes: int


class PrefixStore:
    """A directory of prefix states under a size cap (least recently used go first).

    ``budget``: the cap shared with the visual tokens (``Asker.from_options`` passes fila's one
    budget); without it, a cap of ``max_bytes`` on this directory alone.
    """

    def __init__(self, directory: Path, max_bytes: int | None = None, *, budget: CacheBudget | None = None):
        self.directory = Path(directory)
        if budget is None:
            budget = CacheBudget(self.directory) if max_bytes is None else CacheBudget(self.directory, max_bytes)
        self.budget = budget

    @property
    def max_bytes(self) -> int:
        return self.budget.max_bytes

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{STATE_SUFFIX}"

    def get(self, key: str, backend: LlamaBackend) -> PrefixState | None:
        """The state stored under ``key``, ready for ``backend.load_state``; None when absent or damaged."""
        from safetensors import SafetensorError, safe_open

        from fila_cli.llm.backend import PrefixState

        path = self._path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = handle.metadata() or {}
                data = handle.get_tensor(_STATE)
                input_ids = handle.get_tensor(_INPUT_IDS)
            if int(meta["version"]) != PREFIX_FORMAT_VERSION or zlib.crc32(data) != int(meta["crc32"]):
                raise ValueError("checksum or version mismatch")
            if data.dtype != np.uint8 or data.ndim != 1 or input_ids.ndim != 1 or len(input_ids) > backend.n_ctx:
                raise ValueError("not a state of this store's format, or larger than the context")
            prefix = PrefixState(data, input_ids.astype(np.intc), int(meta["n_prompt_tokens"]), int(meta["n_visual_tokens"]))
        except (SafetensorError, OSError, KeyError, TypeError, ValueError):
            path.unlink(missing_ok=True)  # damaged: recomputed by the caller
            return None
        touch(path)
        return prefix

    def discard(self, key: str) -> None:
        """Forget the state under ``key`` (llama.cpp refused it): the caller decodes it again."""
        self._path(key).unlink(missing_ok=True)

    def put(self, key: str, state: PrefixState) -> None:
        """Store ``state`` atomically, then evict the least recently used entries over the cap."""
        from safetensors.numpy import save_file

        data = np.ascontiguousarray(state.data, dtype=np.uint8)
        arrays = {_STATE: data, _INPUT_IDS: np.ascontiguousarray(state.input_ids, dtype=np.int32)}
        meta = {"version": str(PREFIX_FORMAT_VERSION), "crc32": str(zlib.crc32(data)),
                "n_prompt_tokens": str(state.n_prompt_tokens), "n_visual_tokens": str(state.n_visual_tokens)}
        if not self.budget.fits(data.nbytes):
            return  # larger than the whole cache: keeping it would evict everything else for nothing
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file(arrays, str(partial), metadata=meta)
        os.replace(partial, path)
        touch(path)
        self.evict(keep=path)

    def _entries(self) -> list[Path]:
        return list(self.directory.glob(f"*{STATE_SUFFIX}")) if self.directory.exists() else []

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries (of the whole budget) until it fits its cap; the number removed."""
        return len(self.budget.evict(keep=keep))

    def info(self) -> StoreInfo:
        entries = self._entries()
        return StoreInfo(self.directory, len(entries), sum(p.stat().st_size for p in entries))

    def clear(self) -> int:
        files = [*self._entries(), *(self.directory.glob("*.partial") if self.directory.exists() else [])]
        for file in files:
            file.unlink(missing_ok=True)
        return len(files)
