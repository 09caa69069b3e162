"""The raw llama.cpp layer under ``LlamaBackend``: batches, sequences, contexts.

Like llama-cpp-python's own ``_internals.py`` beside its ``llama.py``, this module holds what talks
to llama.cpp below the high-level ``Llama`` object:

- ``EmbeddingBatch`` and ``TokenBatch``: ``llama_batch`` buffers filled row by row (embeddings
  copied with ``ctypes.memmove``, each row's position and sequence id), decoded with ``decode``;
- every use of llama-cpp-python's *private* members (``_init_sampler``, ``_requires_eval``,
  ``_ctx``, ``_model``, ``_stack``, ``_lora_adapter``, ``_n_ctx``), so that a new llama-cpp-python
  breaks one module, and the range it is tested with is pinned in ``pyproject.toml``
  (``TESTED_LLAMA_CPP_PYTHON``).

Nothing here knows about prompts, answers or fila's options.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import weakref

import llama_cpp
import numpy as np

# llama-cpp-python releases whose private members this module was written against (pyproject.toml
# pins the same range): a release outside it may rename them.
TESTED_LLAMA_CPP_PYTHON = ">=0.3.36,<0.4"
# llama_decode return code: no KV-cache slot for the batch (context full).
DECODE_NO_KV_SLOT = 1
# ``Llama.input_ids`` entry for a position filled from embeddings. Never a real token id, so the
# prefix matching of ``Llama.generate(reset=True)`` can never mistake an image for cached text.
IMAGE_PLACEHOLDER_ID = -1


# --- llama.cpp logging ---------------------------------------------------------------------------

_log_verbose = False


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # Called from C for every llama.cpp/ggml log line: dropped unless --verbose.
    if _log_verbose and text:
        sys.stderr.write(text.decode("utf-8", errors="replace"))
        sys.stderr.flush()


def install_log_callback(verbose: bool) -> None:
    """Route llama.cpp's (and ggml's) log through ``_llama_log``. The callback is a module
    global, so ctypes' trampoline is never garbage-collected while C may call it."""
    global _log_verbose
    _log_verbose = verbose
    llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))


# --- the Llama object's private members ----------------------------------------------------------


class ParallelLlama(llama_cpp.Llama):
    """``Llama`` whose context holds ``n_seq_max`` sequences, each in its own KV cache.

    ``Llama.__init__`` makes its ``context_params`` and the context in one go, and sets n_seq_max
    only for embedding models; this property hands the sequence settings to the params as soon as
    ``__init__`` creates them, before the context is made from them."""

    def __init__(self, *args, n_seq_max: int, **kwargs):
        self._n_seq_max = n_seq_max
        super().__init__(*args, **kwargs)

    @property
    def context_params(self) -> llama_cpp.llama_context_params:
        return self._context_params

    @context_params.setter
    def context_params(self, params: llama_cpp.llama_context_params) -> None:
        params.n_seq_max = self._n_seq_max
        # One KV stream per sequence, n_ctx / n_seq_max cells each: a sequence attends only to its
        # own cells, so its prompt decodes as it does alone, and one long answer cannot crowd out
        # another's room.
        params.kv_unified = False
        self._context_params = params


def init_sampler(llm: llama_cpp.Llama, *, temp: float, top_p: float, **neutral: float):
    """A sampler chain built as ``Llama.generate`` builds it (a ``LlamaSampler``; close it)."""
    return llm._init_sampler(temp=temp, top_p=top_p, **neutral)


def mark_logits_restored(llm: llama_cpp.Llama) -> None:
    """The last logits came from a restored state, not a live decode: ``Llama`` must decode again
    before it samples from its own scores."""
    llm._requires_eval = True


def model_metadata(llm: llama_cpp.Llama) -> dict[str, str]:
    return llm.metadata or {}


def recreate_context(llm: llama_cpp.Llama, n_ctx: int) -> None:
    """Replace ``llm``'s llama.cpp context by one of ``n_ctx`` cells (all sequences together) on the
    same loaded weights: what is decoded is lost, the weights stay. ``Llama`` has no API for it;
    this does what its ``__init__`` does for the context (the LoRA adapter set on it again, the
    token bookkeeping sized to it). The old context is freed first, so that both never take memory
    at once; when the new one cannot be made, one of the old size is made again and the error raised."""
    params = llm.context_params
    old_n_ctx = params.n_ctx
    llm._ctx.close()
    try:
        _new_context(llm, n_ctx)
    except Exception:
        _new_context(llm, old_n_ctx)
        raise


def _new_context(llm: llama_cpp.Llama, n_ctx: int) -> None:
    from llama_cpp import _internals as llama_internals

    llm.context_params.n_ctx = n_ctx
    context = llama_internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=llm.verbose)
    llm._ctx = llm._stack.enter_context(contextlib.closing(context))
    adapter = getattr(llm, "_lora_adapter", None)
    if adapter is not None:  # as Llama.__init__ sets it
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(llm.lora_scale)
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales):
            raise RuntimeError("cannot set the LoRA adapter on the new context")
    llm._n_ctx = llm.n_ctx()
    llm.input_ids = np.ndarray((n_ctx,), dtype=np.intc)
    llm.n_tokens = 0
    llm._requires_eval = True


# --- batches -------------------------------------------------------------------------------------


def remove_kv_from(ctx: llama_cpp.llama_context_p, position: int, seq: int = -1) -> None:
    """Forget the KV cells at ``position`` and after (of ``seq``; -1: every sequence)."""
    memory = llama_cpp.llama_get_memory(ctx)
    if memory is not None:
        llama_cpp.llama_memory_seq_rm(memory, seq, position, -1)


def decode(ctx: llama_cpp.llama_context_p, batch: EmbeddingBatch | TokenBatch) -> int:
    """``llama_decode`` of the batch's rows; its return code (0: done; DECODE_NO_KV_SLOT: full)."""
    return int(llama_cpp.llama_decode(ctx, batch.batch))


class EmbeddingBatch:
    """A ``llama_batch`` of up to ``n_rows`` embedding rows of ``width`` floats, one sequence a fill."""

    def __init__(self, n_rows: int, width: int):
        self.n_rows = n_rows
        self.batch = llama_cpp.llama_batch_init(n_rows, width, 1)
        self._free = weakref.finalize(self, llama_cpp.llama_batch_free, self.batch)
        self._seq = -1
        self.set_sequence(0)

    def set_sequence(self, seq: int) -> None:
        """Every row belongs to ``seq``; written only when it changes (otherwise only embd, pos and
        logits change between fills)."""
        if seq == self._seq:
            return
        batch = self.batch
        ones = np.ones(self.n_rows, dtype=np.int32)
        ctypes.memmove(batch.n_seq_id, ones.ctypes.data, ones.nbytes)
        for row in range(self.n_rows):
            batch.seq_id[row][0] = seq
        self._seq = seq

    def fill(self, chunk: np.ndarray, position: int, *, logits_last: bool) -> None:
        """Rows [n <= n_rows, width] (float32, C-contiguous) at positions ``position``.., logits for
        the last row only when ``logits_last``."""
        batch, n = self.batch, len(chunk)
        positions = np.arange(position, position + n, dtype=np.int32)
        ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
        ctypes.memmove(batch.pos, positions.ctypes.data, positions.nbytes)
        ctypes.memset(batch.logits, 0, n)
        batch.logits[n - 1] = logits_last
        batch.n_tokens = n

    def close(self) -> None:
        self._free()


class TokenBatch:
    """A ``llama_batch`` of up to ``n_rows`` token ids, each row with its own position and sequence."""

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.batch = llama_cpp.llama_batch_init(n_rows, 0, 1)
        self._free = weakref.finalize(self, llama_cpp.llama_batch_free, self.batch)

    def set_row(self, row: int, token: int, position: int, seq: int, *, logits: bool) -> None:
        batch = self.batch
        batch.token[row] = token
        batch.pos[row] = position
        batch.n_seq_id[row] = 1
        batch.seq_id[row][0] = seq
        batch.logits[row] = logits

    def set_length(self, n: int) -> None:
        self.batch.n_tokens = n

    def close(self) -> None:
        self._free()


def logits_row(ctx: llama_cpp.llama_context_p, row: int, n_vocab: int) -> np.ndarray | None:
    """The last decode's logits [n_vocab] of ``row`` (-1: its last), a view into llama.cpp's
    buffer (copy it to keep it past the next decode); None when that row asked for none."""
    ptr = llama_cpp.llama_get_logits_ith(ctx, row)
    if not ptr:
        return None
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


def sample_row(sampler, ctx: llama_cpp.llama_context_p, row: int) -> int:
    """A token from ``sampler`` (a ``LlamaSampler`` of ``init_sampler``) on the logits of ``row``;
    the chain also takes the token into its history."""
    return int(llama_cpp.llama_sampler_sample(sampler.sampler, ctx, row))
