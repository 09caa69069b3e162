"""The LLM state after [prompt start, pages], reused instead of decoded again.

- In memory (``reuse_prefix``): the last pages' state, so a further question on them decodes only
  its own text (``fila batch`` with several questions, ``fila chat``).
- On disk (``PrefixStore``): keyed by the LLM file, its context settings, the pages' token-cache
  keys and the prefix's text, so a page already asked about is not prefilled again, even by
  another process.
- A stored state llama.cpp refuses (another build or setting wrote it) is dropped and the prefix
  decoded again, as a damaged entry is: ``fila ask``, ``fila batch`` and ``fila chat`` all go
  through ``PrefixReuse``, so they recover alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from fila_cli.llm import Generation, PrefixState, StateRefusedError
from fila_cli.llm.prefix_store import PrefixStore, prefix_cache_key
from fila_cli.llm.sampling import SamplingParams
from fila_cli.qa.pages import PreparedPage
from fila_cli.vision.loaders.identity import file_identity

TextCallback = Callable[[str], None]
T = TypeVar("T")


class PrefixReuse:
    """The prefix states of one loaded LLM (``backend``, of the file at ``llm_path``, with the LoRA
    adapter at ``lora_path`` applied if any: a LoRA changes every state, so it is part of the key)."""

    def __init__(self, backend, llm_path, prefix_store: PrefixStore | None = None, reuse_prefix: bool = False,
                 lora_path=None):
        self.backend = backend
        self.store = prefix_store
        self.reuse_prefix = reuse_prefix
        self._last: tuple[tuple, PrefixState] | None = None  # (memory key, state) of the last pages
        self._llm_identity = file_identity(llm_path) if prefix_store is not None else None
        self._lora_identity = file_identity(lora_path) if prefix_store is not None and lora_path else None

    def key(self, prefix: Sequence, pages: Sequence[PreparedPage]) -> str | None:
        """The prefix store's key for [prompt start, pages]; None when a page has no cache key."""
        if self._llm_identity is None or any(p.visual_key is None for p in pages):
            return None
        return prefix_cache_key(self._llm_identity, self.backend.n_ctx, [p.visual_key for p in pages],
                                [s for s in prefix if isinstance(s, str)], flash_attn=self.backend.settings.flash_attn,
                                n_seq_max=self.backend.n_seq_max, lora_identity=self._lora_identity)

    def state(self, prefix: Sequence, pages: Sequence[PreparedPage], *, persist: bool = True) -> tuple[PrefixState, float]:
        """The LLM state after ``prefix``, from memory, from disk, or decoded (then kept, on disk only
        with ``persist``); and the seconds it took."""
        started = time.perf_counter()
        memory_key = (tuple(p.visual_key for p in pages), tuple(s for s in prefix if isinstance(s, str)))
        if self._last is not None and self._last[0] == memory_key:
            return self._last[1], 0.0
        self._last = None  # free the previous pages' state before making the next
        disk_key = self.key(prefix, pages)
        state = None
        if disk_key is not None and self.store is not None:
            state = self.store.get(disk_key)
        if state is None:
            self.backend.prefill(prefix)
            state = self.backend.save_state()
            if persist and disk_key is not None and self.store is not None:
                self.store.put(disk_key, state)
        if self.reuse_prefix:
            self._last = (memory_key, state)
        return state, time.perf_counter() - started

    def retrying_refused(self, prefix: Sequence, pages: Sequence[PreparedPage], run: Callable[[], T]) -> T:
        """``run()``; when llama.cpp refuses the stored state it restored, the entry is dropped (from
        disk and memory) and ``run()`` tried once more, which decodes the prefix again."""
        try:
            return run()
        except StateRefusedError:
            key = self.key(prefix, pages)
            if key is None or self.store is None:
                raise
            self.store.discard(key)
            self._last = None
            return run()

    def generate(self, prefix: list, after: str, sampling: SamplingParams, pages: Sequence[PreparedPage],
                 on_text: TextCallback | None = None, *, persist: bool = True) -> Generation:
        """[prefix, after] through the LLM, the prefix's state reused in memory or on disk when it can be.

        ``persist``: write a newly decoded prefix to the store. Off while a scan is read page by page:
        twenty pages' states (up to a GB each for a 7B model) would cost more to write than they save.
        """
        return self.retrying_refused(prefix, pages,
                                     lambda: self._generate_once(prefix, after, sampling, pages, on_text, persist))

    def _generate_once(self, prefix: list, after: str, sampling: SamplingParams, pages: Sequence[PreparedPage],
                       on_text: TextCallback | None, persist: bool) -> Generation:
        keyed = all(p.visual_key is not None for p in pages)
        if not keyed or (not self.reuse_prefix and self.store is None):
            return self.backend.generate([*prefix, after], sampling, on_text=on_text)
        if not self.reuse_prefix and not persist:  # nothing to keep: use a stored state, else decode it all
            started = time.perf_counter()
            key = self.key(prefix, pages)
            state = self.store.get(key) if key is not None and self.store is not None else None
            load_s = time.perf_counter() - started
            if state is None:
                return self.backend.generate([*prefix, after], sampling, on_text=on_text)
            generation = self.backend.generate_from_state(state, [after], sampling, on_text=on_text)
            generation.prefill_s += load_s
            return generation
        state, prefix_s = self.state(prefix, pages, persist=persist)
        generation = self.backend.generate_from_state(state, [after], sampling, on_text=on_text)
        generation.prefill_s += prefix_s
        return generation
