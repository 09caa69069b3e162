"""LLM prefix states on disk: a second question about a page loads the page instead of prefilling it.

Prefilling [prompt start, page] costs one forward pass over ~2,300 visual tokens: tens of seconds
for a 7B model on a CPU. llama.cpp can export the state it leaves (the KV cache and the last
logits, ``llama_state_get_data``); this store keeps that export on disk so that a later ``fila ask``
or ``fila chat`` about the same page restores it in about the time it takes to read the file.

- Key: the caller's string, built by :func:`prefix_cache_key` from the LLM file's (and LoRA's) identity, the
  context size, the visual tokens' cache keys (document, page, render settings, vision weights)
  and the prompt text around them (the template and system prompt).
- Entries are safetensors files (the state bytes, the prompt's token ids) in the ``llm-prefix``
  store of fila's cache folder (``caches/``), with a CRC-32 over all they hold: a damaged or
  truncated entry is deleted and recomputed, never loaded.
- Writes go to a temporary file renamed into place: a kill leaves the old entry or the new one.
  A write that fails (full disk, read-only folder) warns once and the answer goes on.
- LRU by size, one cap for all of fila's cache (``caches.budget.CacheBudget``): a hit refreshes the
  entry's modification time; after each write the least recently used entries, prefix states or
  visual tokens, are removed until the cache folder fits ``--cache-max-gb``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fila_cli.caches.budget import CacheBudget
from fila_cli.caches.entries import StoreInfo
from fila_cli.caches.folder import CacheFolder

if TYPE_CHECKING:  # llama.cpp loads only when a state is restored
    from fila_cli.llm.backend import PrefixState

# Bump when what a state holds, or how the prompt before the question is built, changes.
# 2: the key holds the attention kernel (flash attention lays the KV cache out otherwise).
# 3: the key holds the LoRA adapter; the checksum covers the token ids and metadata too.
PREFIX_FORMAT_VERSION = 3
_STATE = "llama_state"
_INPUT_IDS = "input_ids"


def prefix_cache_key(llm_identity: str, n_ctx: int, visual_keys: list[str], prompt_texts: list[str], *,
                     flash_attn: bool = True, n_seq_max: int = 1, lora_identity: str | None = None) -> str:
    """Everything the state after [texts and pages] depends on, hashed: llama.cpp refuses a state
    saved by a context of another size, attention kernel or number of sequences, but would restore
    one computed without the bundle's LoRA adapter (``lora_identity``) as if it were with."""
    settings = {"version": PREFIX_FORMAT_VERSION, "llm": llm_identity, "lora": lora_identity, "n_ctx": n_ctx,
                "visual": visual_keys, "texts": prompt_texts, "flash_attn": flash_attn}
    if n_seq_max > 1:  # a context for several sequences (fila batch --parallel); one: the keys as before
        settings["n_seq_max"] = n_seq_max
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class PrefixStore:
    """LLM prefix states in the ``llm-prefix`` store of fila's cache folder (default: the user's,
    under its default cap), under the cap the folder's stores share. A ``KeyedCache[PrefixState]``."""

    def __init__(self, folder: CacheFolder | None = None):
        self.folder = folder or CacheFolder()
        self.store = self.folder.llm_prefix

    @property
    def directory(self) -> Path:
        return self.store.directory

    @property
    def budget(self) -> CacheBudget:
        return self.folder.budget

    @property
    def max_bytes(self) -> int:
        return self.budget.max_bytes

    def get(self, key: str) -> PrefixState | None:
        """The state stored under ``key``, ready for ``LlamaBackend.load_state``; None when absent or damaged."""
        from fila_cli.llm.backend import PrefixState

        entry = self.store.read(key)
        if entry is None:
            return None
        try:
            meta, data, input_ids = entry.metadata, entry.arrays[_STATE], entry.arrays[_INPUT_IDS]
            if int(meta["version"]) != PREFIX_FORMAT_VERSION:
                raise ValueError("another format")
            if data.dtype != np.uint8 or data.ndim != 1 or input_ids.ndim != 1:
                raise ValueError("not a state of this store's format")
            return PrefixState(data, input_ids.astype(np.intc), int(meta["n_prompt_tokens"]), int(meta["n_visual_tokens"]))
        except (KeyError, TypeError, ValueError):
            self.store.discard(key)  # whole and checked, but not what this fila writes: recomputed
            return None

    def discard(self, key: str) -> None:
        """Forget the state under ``key`` (llama.cpp refused it): the caller decodes it again."""
        self.store.discard(key)

    def put(self, key: str, value: PrefixState) -> None:
        """Store the state atomically, then evict the least recently used entries over the cap."""
        data = np.ascontiguousarray(value.data, dtype=np.uint8)
        if not self.budget.fits(data.nbytes):
            return  # larger than the whole cache: keeping it would evict everything else for nothing
        arrays = {_STATE: data, _INPUT_IDS: np.ascontiguousarray(value.input_ids, dtype=np.int32)}
        meta = {"version": str(PREFIX_FORMAT_VERSION), "n_prompt_tokens": str(value.n_prompt_tokens),
                "n_visual_tokens": str(value.n_visual_tokens)}
        self.store.write(key, arrays, meta)

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries (of the whole budget) until it fits its cap; the number removed."""
        return len(self.budget.evict(keep=keep))

    def info(self) -> StoreInfo:
        return self.store.info()

    def clear(self) -> int:
        return self.store.clear()
