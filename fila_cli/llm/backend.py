"""The GGUF language model, driven by llama.cpp through llama-cpp-python (DESIGN §5).

A prompt is a list of *segments*: ``str`` (text, tokenised with special tokens parsed) or a
float32 array ``[n, n_embd]`` of embeddings (the visual tokens). Text goes through the
high-level ``Llama.eval``; embeddings go in as rows of an embedding batch (``_internals``),
``n_batch`` rows at a time. After every embedding chunk the ``Llama`` object's own bookkeeping
(``n_tokens``, ``input_ids``) is advanced, because ``Llama.eval`` starts by removing every KV-cache
cell at or beyond ``n_tokens``: without it the next eval would erase the image.

    backend = LlamaBackend("model.gguf", n_ctx=4096)
    answer = backend.generate([before, visual_tokens, after], SamplingParams(max_tokens=64))
    print(answer.text, answer.mean_logprob)

``Llama.scores`` is not filled when ``logits_all=False``, so the log-probabilities of the answer
are read from llama.cpp's logits after each decode.

The context grows when a prompt needs more than it holds (``ensure_context``, ``context_size``),
unless it was set explicitly (``grow=False``, ``--ctx-size``). Several prompts are answered side by
side by ``generate_many`` (``parallel``). Every use of llama-cpp-python's private members is in
``_internals``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import llama_cpp
import numpy as np

from fila_cli.errors import ModelError
from fila_cli.gguf_files import CLIP_ARCHITECTURE, GGUFHeader, read_gguf_header, require_gguf
from fila_cli.llm import _internals
from fila_cli.llm._internals import DECODE_NO_KV_SLOT, IMAGE_PLACEHOLDER_ID
from fila_cli.llm.context_size import (
    ContextLimit,
    ContextOverflowError,
    KVShape,
    available_memory,
    grown_size,
    kv_shape,
    memory_limit,
)
from fila_cli.llm.generation import DecodeStats, Generation, StopReason, stop_after
from fila_cli.llm.sampling import DEFAULT_MAX_TOKENS, SamplingParams, TextCallback, TextStream, log_softmax_at

log = logging.getLogger(__name__)


class StateRefusedError(ModelError):
    """llama.cpp would not restore a saved state (saved by another build or context settings)."""


# One prompt segment: text, or embedding rows [n, n_embd] (float32).
Segment = str | np.ndarray

ALL_LAYERS = -1  # llama-cpp-python's n_gpu_layers for "offload every layer"
TOKEN_PIECE_BUFFER = 64  # bytes; llama_token_to_piece asks for more when a piece is longer
# Architectures that are GGUF files of this project but not language models.
NOT_LLM_ARCHITECTURES = {CLIP_ARCHITECTURE: "a vision projector (mmproj)"}
# Sampling knobs of llama-cpp-python that fila leaves neutral (only temperature/top_p are exposed).
NEUTRAL_SAMPLER = dict(top_k=0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
# Room for the answer when the context grows for a prompt: the default --max-tokens.
ANSWER_ROOM = DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class LlamaSettings:
    """How llama.cpp runs the model: batch sizes, attention kernel, threads.

    The defaults are for a page's ~2,300 visual tokens on a 7B model (``benchmarks/llm_prefill.py``
    measures them; docs/speed-and-benchmarks.md, "LLM settings", has the figures)."""

    # Rows fila hands llama_decode at once (the logical batch: a whole page in one call) and rows
    # per compute graph (the physical batch).
    n_batch: int = 2048
    n_ubatch: int = 512
    # llama.cpp's fused attention kernel (FLASH_ATTN_TYPE_ENABLED): softmax(QK^T)V without the
    # [tokens x context] score matrix per head, which a 2,300-token page makes large.
    flash_attn: bool = True
    # Threads for generation (one token a step) and for prompt batches; None: every physical core.
    n_threads: int | None = None
    n_threads_batch: int | None = None
    # Prompts ``generate_many`` decodes side by side. Each sequence gets a KV cache of its own with
    # the full n_ctx (llama.cpp's non-unified cache: n_ctx x n_seq_max cells in all), so the
    # cache's memory grows n_seq_max times. 1: one prompt at a time (fila ask, chat).
    n_seq_max: int = 1


def physical_cores() -> int:
    """Cores this process may run on, the hyper-threads of one core counted once, as llama.cpp's
    own tools count them for their default thread count. Linux reads the CPU topology; elsewhere
    every logical CPU counts."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    siblings = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            siblings.add(topology.read_text().strip())
        except OSError:
            return len(allowed)
    return max(len(siblings), 1)


@dataclass
class PrefixState:
    """A decoded prefix (e.g. system prompt + image) to restore with ``load_state``.

    Held as llama.cpp's own export (``llama_state_get_data``: KV cache, last logits) in a numpy
    buffer, plus the prefix's token ids; not as ``Llama.save_state``'s ``LlamaState``, which also
    copies a [positions, vocabulary] float matrix of logits that nothing reads with
    ``logits_all=False`` (300 MB for a 7B model's page) and copies the state twice more to restore it.
    """

    data: np.ndarray  # uint8 [n_bytes]: llama.cpp's state export
    input_ids: np.ndarray  # intc [n_tokens]: token ids, IMAGE_PLACEHOLDER_ID at image positions
    n_prompt_tokens: int
    n_visual_tokens: int

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class _PromptCounts:
    n_prompt_tokens: int = 0
    n_visual_tokens: int = 0


# --- model loading -------------------------------------------------------------------------------


def _check_gguf(path: Path) -> None:
    require_gguf(path, "LLM", "pass a GGUF language model, or download one with `fila weights pull`")


def _explain_load_failure(path: Path, header: GGUFHeader | None) -> str:
    """Why llama.cpp refused the file, as far as its GGUF header tells."""
    if header is None:
        return "the GGUF file is corrupt or truncated; download it again"
    if header.is_adapter:
        return "it is a LoRA adapter, not a language model; pass the base LLM GGUF"
    if header.architecture in NOT_LLM_ARCHITECTURES:
        return f"it is {NOT_LLM_ARCHITECTURES[header.architecture]}, not a language model; pass the LLM GGUF"
    return (f"llama.cpp cannot load it (architecture '{header.architecture}'); the file may be corrupt or need a "
            "newer llama-cpp-python")


def _read_header(path: Path) -> GGUFHeader | None:
    """The LLM's GGUF header, or None when it cannot be parsed (llama.cpp then says why it fails)."""
    try:
        return read_gguf_header(path, "LLM")
    except ModelError:
        return None


def _default_gpu_layers() -> int:
    return ALL_LAYERS if llama_cpp.llama_supports_gpu_offload() else 0


# --- the backend ---------------------------------------------------------------------------------


class LlamaBackend:
    """A GGUF LLM with prompts made of text and embedding segments."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_ctx: int = 4096,
        n_batch: int | None = None,
        n_gpu_layers: int | None = None,
        seed: int = 0,
        n_threads: int | None = None,
        verbose: bool = False,
        lora_path: str | os.PathLike | None = None,
        settings: LlamaSettings | None = None,
        grow: bool = True,
    ):
        """n_ctx: the context to start with (per prompt), capped at the model's training. grow: let
        the context grow past it when a prompt needs more (``ensure_context``); False keeps it fixed,
        as ``--ctx-size`` asks. lora_path: a GGUF LoRA adapter (as ``fila train`` stage 2 writes),
        applied through llama.cpp's adapter API on top of the model. settings: batch sizes, flash
        attention and threads (default ``LlamaSettings()``); ``n_batch`` / ``n_threads`` override its fields."""
        settings = settings or LlamaSettings()
        if n_batch is not None:
            settings = replace(settings, n_batch=n_batch, n_ubatch=min(settings.n_ubatch, n_batch))
        if n_threads is not None:
            settings = replace(settings, n_threads=n_threads, n_threads_batch=n_threads)
        self.settings = settings
        self.path = Path(model_path)
        _check_gguf(self.path)
        header = _read_header(self.path)
        # The context the model was trained for; None when its GGUF does not say.
        self.n_ctx_train = header.context_length if header is not None else None
        self.n_ctx_requested = n_ctx
        self.grow = grow
        # Called with one line when the context grows (the CLI prints it on stderr); default: logged.
        self.on_context_note: Callable[[str], None] = log.info
        # Past its training a model's positions are out of distribution: never run it there.
        if self.n_ctx_train is not None and n_ctx > self.n_ctx_train:
            n_ctx = self.n_ctx_train
        if lora_path is not None:
            _check_gguf(Path(lora_path))
        if settings.n_seq_max < 1:
            raise ValueError(f"n_seq_max must be at least 1 (got {settings.n_seq_max})")
        _internals.install_log_callback(verbose)
        parallel = settings.n_seq_max > 1
        make_llama = partial(_internals.ParallelLlama, n_seq_max=settings.n_seq_max) if parallel else llama_cpp.Llama
        self._n_gpu_layers = _default_gpu_layers() if n_gpu_layers is None else n_gpu_layers
        try:
            self._llm = make_llama(
                str(self.path),
                # n_ctx is per prompt: with several sequences llama.cpp splits its context among them.
                n_ctx=n_ctx * settings.n_seq_max,
                n_batch=settings.n_batch,
                n_ubatch=settings.n_ubatch,
                flash_attn=settings.flash_attn,
                n_gpu_layers=self._n_gpu_layers,
                seed=seed,
                # llama-cpp-python's defaults: half the logical CPUs for generation, all of them for
                # prompts; on a 2-core machine without hyper-threads that left one core idle.
                n_threads=settings.n_threads or physical_cores(),
                n_threads_batch=settings.n_threads_batch or physical_cores(),
                embedding=False,
                logits_all=False,
                verbose=verbose,
                lora_path=None if lora_path is None else str(lora_path),
            )
        except (ValueError, RuntimeError) as e:
            if lora_path is not None and "LoRA" in str(e):
                raise ModelError(f"{lora_path}: llama.cpp cannot apply this LoRA adapter to {self.path} ({e}); it must be written for this base model") from e
            raise ModelError(f"{self.path}: cannot load the LLM: {_explain_load_failure(self.path, header)}") from e
        self._n_batch = self._llm.n_batch
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._n_vocab = self._llm.n_vocab()
        self._n_embd = self._input_width()
        self._n_ctx = self._context_cells(n_ctx)
        self._counts = _PromptCounts()
        self.stats = DecodeStats()
        # One embedding batch for the backend's lifetime (n_batch rows), and token ids for
        # generate_many (a prompt chunk, or one token of each sequence).
        self.embedding_batch = _internals.EmbeddingBatch(self._n_batch, self._n_embd)
        self.token_batch = _internals.TokenBatch(max(self._n_batch, settings.n_seq_max))

    def _context_cells(self, n_ctx: int) -> int:
        # llama.cpp rounds its context up (to a multiple of 256), but Llama.input_ids holds only
        # the n_ctx asked for: the smaller is the real limit (per sequence with several).
        cells = llama_cpp.llama_n_ctx_seq(self._llm.ctx) if self.n_seq_max > 1 else self._llm.n_ctx()
        return min(cells, n_ctx)

    # -- properties --

    def _input_width(self) -> int:
        # Width of an input embedding row; differs from n_embd for some multimodal LLMs.
        if hasattr(llama_cpp, "llama_model_n_embd_inp"):
            return int(llama_cpp.llama_model_n_embd_inp(self._llm.model))
        return int(llama_cpp.llama_model_n_embd(self._llm.model))

    @property
    def n_embd(self) -> int:
        return self._n_embd

    @property
    def n_ctx(self) -> int:
        """Positions one prompt and its answer may fill now (per sequence with ``n_seq_max`` > 1)."""
        return self._n_ctx

    @property
    def n_seq_max(self) -> int:
        """Prompts ``generate_many`` may answer side by side."""
        return self.settings.n_seq_max

    @property
    def context_note(self) -> str | None:
        """A line for the user when the context asked for was capped at the model's training, else None."""
        if self.n_ctx_requested <= self._n_ctx or self.n_ctx_train is None:
            return None
        return (f"{self.path.name} was trained on a {self.n_ctx_train}-token context: its context is capped there "
                f"({self.n_ctx_requested} asked)")

    @property
    def context_summary(self) -> str:
        """One line: the context now and how far it may grow, and why (said once at load)."""
        limit = self.context_limit()
        if not self.grow:
            return f"LLM context {self._n_ctx} tokens (--ctx-size)"
        if limit.n_ctx <= self._n_ctx:
            return f"LLM context {self._n_ctx} tokens ({limit.describe()})"
        return f"LLM context {self._n_ctx} tokens, grown as prompts need up to {limit.n_ctx}: {limit.why()}"

    @property
    def kv_shape(self) -> KVShape:
        """One KV-cache position's shape: layers, KV heads, head dimensions."""
        model = self._llm.model
        metadata = _internals.model_metadata(self._llm)
        return kv_shape(n_layer=llama_cpp.llama_model_n_layer(model), n_head=llama_cpp.llama_model_n_head(model),
                        n_head_kv=llama_cpp.llama_model_n_head_kv(model), n_embd=llama_cpp.llama_model_n_embd(model),
                        metadata=metadata, architecture=metadata.get("general.architecture", ""))

    def context_limit(self) -> ContextLimit:
        """The largest context a prompt may have: now (fixed), or after growing (the trained context,
        or less when memory does not allow it)."""
        if not self.grow:
            return ContextLimit(self._n_ctx, "fixed", self.model_name, self.n_ctx_train)
        if self.n_ctx_train is None:
            return ContextLimit(self._n_ctx, "unknown", self.model_name)
        bytes_per_token = self.kv_shape.bytes_per_token
        memory = available_memory(on_gpu=self._n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload())
        allowed = memory_limit(self._n_ctx, self.n_seq_max, bytes_per_token, memory)
        if allowed is not None and allowed < self.n_ctx_train:
            return ContextLimit(max(allowed, self._n_ctx), "memory", self.model_name, self.n_ctx_train, memory,
                                bytes_per_token)
        return ContextLimit(self.n_ctx_train, "trained", self.model_name, self.n_ctx_train)

    def ensure_context(self, n_needed: int, *, room: int = ANSWER_ROOM) -> bool:
        """Whether a prompt of ``n_needed`` positions (its answer's first token included) fits the
        context, grown when it must and may: to ``n_needed + room`` in llama.cpp's steps, up to
        ``context_limit()``. Growing makes a new context on the same weights, so what is decoded
        is lost (saved ``PrefixState``s stay valid); the user is told with ``on_context_note``."""
        if n_needed <= self._n_ctx:
            return True
        if not self.grow:
            return False
        limit = self.context_limit()
        if n_needed > limit.n_ctx:
            return False
        self._resize(grown_size(n_needed, room, limit.n_ctx), n_needed, limit)
        return True

    def _resize(self, n_ctx: int, n_needed: int, limit: ContextLimit) -> None:
        old = self._n_ctx
        try:
            _internals.recreate_context(self._llm, n_ctx * self.n_seq_max)
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{self.path}: llama.cpp could not make a context of {n_ctx} tokens ({e}); "
                             "set a smaller one with --ctx-size") from e
        self._n_ctx = self._context_cells(n_ctx)
        self._counts = _PromptCounts()
        self.on_context_note(f"LLM context grown from {old} to {self._n_ctx} tokens for a {n_needed}-token prompt "
                             f"(at most {limit.n_ctx}: {limit.why()})")

    def overflow(self, n_needed: int, subject: str, detail: str, advice: str | None = None) -> ContextOverflowError:
        """The refusal of a prompt that cannot fit: ``subject`` needs ``n_needed`` tokens (``detail``),
        the real limit, and what would make it fit (``advice`` first when given)."""
        limit = self.context_limit()
        advice = f"{advice}; or {limit.advice()}" if advice else limit.advice()
        return ContextOverflowError(f"{subject} {n_needed} tokens ({detail}) but {limit.describe()}; {advice}",
                                    n_needed=n_needed, n_ctx=limit.n_ctx)

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def vocab(self) -> llama_cpp.llama_vocab_p:
        return self._vocab

    @property
    def ctx(self) -> llama_cpp.llama_context_p:
        """llama.cpp's context (a new one after the context grows)."""
        return self._llm.ctx

    @property
    def n_batch(self) -> int:
        return self._n_batch

    @property
    def model_name(self) -> str:
        return _internals.model_metadata(self._llm).get("general.name") or self.path.stem

    @property
    def chat_template(self) -> str | None:
        return _internals.model_metadata(self._llm).get("tokenizer.chat_template") or None

    @property
    def eos(self) -> int:
        return self._llm.token_eos()

    @property
    def bos(self) -> int:
        return self._llm.token_bos()

    def token_text(self, token: int) -> str:
        """The vocabulary entry of ``token`` (e.g. "<s>"), for chat templates that name it."""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends generation (end of sequence, end of turn, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @property
    def n_past(self) -> int:
        """Positions decoded so far (text and embeddings)."""
        return self._llm.n_tokens

    @property
    def llama(self) -> llama_cpp.Llama:
        """The underlying ``Llama`` (its n_tokens/input_ids are kept consistent)."""
        return self._llm

    # -- tokens --

    def tokenize(self, text: str, *, at_start: bool = False) -> list[int]:
        """Token ids of ``text`` with special tokens parsed. At the start of a prompt, BOS is
        prepended when the model asks for it, unless the text already begins with it."""
        tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        wants_bos = at_start and llama_cpp.llama_vocab_get_add_bos(self._vocab) and self.bos >= 0
        if wants_bos and (not tokens or tokens[0] != self.bos):
            tokens = [self.bos, *tokens]
        return tokens

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        size = TOKEN_PIECE_BUFFER
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # the piece needs -n bytes

    def last_logits(self) -> np.ndarray:
        """Logits [n_vocab] after the last decoded position (a copy)."""
        logits = _internals.logits_row(self._llm.ctx, -1, self._n_vocab)
        if logits is None:
            raise RuntimeError("no logits available: nothing was decoded with logits requested")
        return logits.copy()

    # -- decoding the prompt --

    def reset(self) -> None:
        """Forget everything decoded (the next decode starts at position 0)."""
        self._llm.reset()
        _internals.remove_kv_from(self._llm.ctx, 0)
        self._counts = _PromptCounts()

    def prefill(self, segments: Sequence[Segment], *, append: bool = False) -> None:
        """Decode a prompt. Without ``append`` the context is reset first and BOS may open the
        prompt (only when its first segment is text); with it, decoding continues at ``n_past``."""
        if not append:
            self.reset()
        pieces = self.prepare(segments, at_start=self._llm.n_tokens == 0)
        self.check_fits(pieces)
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            if piece.dtype == np.float32:
                self._decode_embeddings(piece, logits_last=i == last)
                self._counts.n_visual_tokens += len(piece)
                self.stats.embedding_rows += len(piece)
            else:
                self._decode_tokens(piece.tolist())
                self._counts.n_prompt_tokens += len(piece)
                self.stats.text_tokens += len(piece)
        # llama_decode returns with its last batch possibly still computing (the sampler's logits
        # read waits for it): wait here, so that prefill_s is the prefill's whole cost.
        llama_cpp.llama_synchronize(self._llm.ctx)

    def decode_token_ids(self, tokens: Sequence[int]) -> None:
        """Decode known token ids at ``n_past`` (e.g. an answer's last token, which sampling leaves
        undecoded when it stops at max_tokens)."""
        if not tokens:
            return
        if self._llm.n_tokens + len(tokens) > self.n_ctx:
            raise self._overflow(self._llm.n_tokens + len(tokens), f"{len(tokens)} text tokens")
        self._decode_tokens(list(tokens))
        self._counts.n_prompt_tokens += len(tokens)
        self.stats.text_tokens += len(tokens)

    def prepare(self, segments: Sequence[Segment], *, at_start: bool) -> list[np.ndarray]:
        """Segments -> non-empty token arrays (intc) and embedding arrays (float32, [n, n_embd])."""
        pieces: list[np.ndarray] = []
        for segment in segments:
            if isinstance(segment, str):
                tokens = self.tokenize(segment, at_start=at_start and not pieces)
                piece = np.asarray(tokens, dtype=np.intc)
            else:
                piece = np.ascontiguousarray(segment, dtype=np.float32)
                if piece.ndim != 2 or piece.shape[1] != self._n_embd:
                    raise ModelError(
                        f"{self.path}: visual tokens of shape {tuple(piece.shape)} do not fit this LLM, whose "
                        f"embeddings are {self._n_embd} wide; use the projector (mmproj) made for this LLM"
                    )
            if len(piece):
                pieces.append(piece)
        if not pieces:
            raise ValueError("empty prompt: no text tokens and no embeddings")
        return pieces

    def check_fits(self, pieces: Sequence[np.ndarray]) -> None:
        """ContextOverflowError when ``pieces`` cannot follow what is decoded; on an empty context
        the context grows for them when it may."""
        n_visual = sum(len(p) for p in pieces if p.dtype == np.float32)
        n_text = sum(len(p) for p in pieces) - n_visual
        n_needed = self._llm.n_tokens + n_text + n_visual
        if n_needed <= self.n_ctx:
            return
        if self._llm.n_tokens == 0 and self.ensure_context(n_needed + 1):  # + 1: the answer's first token
            return
        raise self._overflow(n_needed, f"{n_visual} visual + {n_text} text tokens")

    def _overflow(self, n_needed: int, detail: str) -> ContextOverflowError:
        return self.overflow(n_needed, f"{self.path}: the prompt needs",
                             f"{detail}, {self._llm.n_tokens} already decoded")

    def _decode_tokens(self, tokens: list[int]) -> None:
        try:
            self._llm.eval(tokens)  # chunks of n_batch; advances n_tokens/input_ids itself
        except RuntimeError as e:
            raise ModelError(f"{self.path}: llama.cpp failed to decode the prompt ({e})") from e

    def _decode_embeddings(self, rows: np.ndarray, *, logits_last: bool) -> None:
        """Decode embedding rows [n, n_embd] at positions n_past.., n_batch rows a call."""
        batch = self.embedding_batch
        batch.set_sequence(0)
        n_rows = len(rows)
        for start in range(0, n_rows, self._n_batch):
            chunk = rows[start : start + self._n_batch]  # contiguous: a slice of C-ordered rows
            n = len(chunk)
            n_past = self._llm.n_tokens
            batch.fill(chunk, n_past, logits_last=logits_last and start + n == n_rows)
            _internals.remove_kv_from(self._llm.ctx, n_past)
            rc = _internals.decode(self._llm.ctx, batch)
            if rc == DECODE_NO_KV_SLOT:
                raise self._overflow(n_past + n_rows - start, f"{n_rows} visual tokens")
            if rc != 0:
                raise ModelError(f"{self.path}: llama.cpp failed to decode the visual tokens (llama_decode returned {rc})")
            # Tell the high-level object what now sits at these positions (see module docstring).
            self._llm.input_ids[n_past : n_past + n] = IMAGE_PLACEHOLDER_ID
            self._llm.n_tokens = n_past + n

    # -- generation --

    def generate(
        self, segments: Sequence[Segment], params: SamplingParams | None = None, on_text: TextCallback | None = None
    ) -> Generation:
        """Decode the prompt, then sample the answer (streamed to ``on_text`` as it comes)."""
        started = time.perf_counter()
        self.prefill(segments)
        return self._sample(params or SamplingParams(), on_text, prefill_s=time.perf_counter() - started)

    def save_state(self) -> PrefixState:
        """Snapshot of the decoded prefix (KV cache and bookkeeping)."""
        ctx = self._llm.ctx
        data = np.empty(int(llama_cpp.llama_state_get_size(ctx)), dtype=np.uint8)
        n_bytes = int(llama_cpp.llama_state_get_data(ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), data.nbytes))
        if n_bytes > data.nbytes:
            raise ModelError(f"{self.path}: llama.cpp could not export its state ({n_bytes} bytes for {data.nbytes})")
        n_tokens = self._llm.n_tokens
        input_ids = np.array(self._llm.input_ids[:n_tokens], dtype=np.intc)
        return PrefixState(data[:n_bytes], input_ids, self._counts.n_prompt_tokens, self._counts.n_visual_tokens)

    def load_state(self, state: PrefixState) -> None:
        """Restore a snapshot of ``save_state`` (of this model, possibly from another process); the
        context grows for it when it must and may."""
        if state.n_tokens > self.n_ctx and not self.ensure_context(state.n_tokens + 1):
            raise ModelError(f"{self.path}: a saved state of {state.n_tokens} positions does not fit the context of {self.n_ctx}")
        data = np.ascontiguousarray(state.data, dtype=np.uint8)
        n_read = int(llama_cpp.llama_state_set_data(self._llm.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                    data.nbytes))
        if n_read != data.nbytes:
            self.reset()  # a refused state may have been applied in part
            raise StateRefusedError(f"{self.path}: llama.cpp refused a saved state (read {n_read} of {data.nbytes} bytes); "
                             "clear it with `fila cache clear`")
        # The high-level object's bookkeeping, as Llama.load_state sets it (without its logits copy).
        self._llm.input_ids[: state.n_tokens] = state.input_ids
        self._llm.n_tokens = state.n_tokens
        _internals.mark_logits_restored(self._llm)
        _internals.remove_kv_from(self._llm.ctx, self._llm.n_tokens)
        self._counts = _PromptCounts(state.n_prompt_tokens, state.n_visual_tokens)

    def generate_from_state(
        self,
        state: PrefixState,
        suffix_segments: Sequence[Segment],
        params: SamplingParams | None = None,
        on_text: TextCallback | None = None,
    ) -> Generation:
        """Restore a decoded prefix, decode only ``suffix_segments`` (non-empty), then sample."""
        started = time.perf_counter()
        self.load_state(state)
        self.prefill(suffix_segments, append=True)
        return self._sample(params or SamplingParams(), on_text, prefill_s=time.perf_counter() - started)

    def continue_generation(
        self, segments: Sequence[Segment], params: SamplingParams | None = None, on_text: TextCallback | None = None
    ) -> Generation:
        """Decode ``segments`` after what is already decoded (a conversation's next turn), then sample."""
        started = time.perf_counter()
        self.prefill(segments, append=True)
        return self._sample(params or SamplingParams(), on_text, prefill_s=time.perf_counter() - started)

    def _sample(self, params: SamplingParams, on_text: TextCallback | None, *, prefill_s: float) -> Generation:
        started = time.perf_counter()
        stream = TextStream(on_text)
        tokens: list[int] = []
        logprobs: list[float] = []
        stop: StopReason | None = None
        self._llm.set_seed(params.seed)
        # Nothing new to eval (reset=False, no tokens): the first token comes from the prefill's
        # logits; each later one after Llama.eval of the previous, which keeps n_tokens right.
        sampler = self._llm.generate(
            [], reset=False, temp=params.temperature, top_p=params.top_p, **NEUTRAL_SAMPLER
        )
        first_token_s = float("nan")
        try:
            for token in sampler:
                if not logprobs:
                    first_token_s = time.perf_counter() - started
                # The logits the sampler just used: the last decode's, as nothing ran since.
                logprobs.append(log_softmax_at(self.last_logits(), token))
                is_end = self.is_end(token)
                if not is_end:
                    tokens.append(token)
                    stream.push(self.token_bytes(token))
                stop = stop_after(is_end=is_end, n_answer=len(tokens), n_decoded=self._llm.n_tokens,
                                  max_tokens=params.max_tokens, n_ctx=self.n_ctx)
                if stop is not None:
                    break
        except RuntimeError as e:
            raise ModelError(f"{self.path}: llama.cpp failed while generating ({e})") from e
        finally:
            sampler.close()
        stream.close()
        return Generation(
            text=stream.text,
            n_prompt_tokens=self._counts.n_prompt_tokens,
            n_visual_tokens=self._counts.n_visual_tokens,
            n_generated=len(tokens),
            mean_logprob=float(np.mean(logprobs)) if logprobs else float("nan"),
            prefill_s=prefill_s,
            generate_s=time.perf_counter() - started,
            token_ids=tokens,
            stop_reason=stop or "max_tokens",
            first_token_s=first_token_s,
        )

    # -- several prompts side by side --

    def prompt_size(self, segments: Sequence[Segment]) -> int:
        """Positions the prompt fills from the start of a context (text tokens, BOS included, and
        embedding rows): it fits when this is at most ``n_ctx``."""
        return sum(len(piece) for piece in self.prepare(segments, at_start=True))

    def generate_many(self, prompts: Sequence[Sequence[Segment]], params: SamplingParams | None = None) -> list[Generation]:
        """Answer up to ``n_seq_max`` prompts together, one ``Generation`` each, in order
        (``parallel.generate_many`` says how)."""
        from fila_cli.llm.parallel import generate_many

        return generate_many(self, prompts, params or SamplingParams())

    # -- lifetime --

    def close(self) -> None:
        self.embedding_batch.close()
        self.token_batch.close()
        self._llm.close()

    def __enter__(self) -> LlamaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "IMAGE_PLACEHOLDER_ID",
    "ContextOverflowError",
    "DecodeStats",
    "Generation",
    "LlamaBackend",
    "LlamaSettings",
    "PrefixState",
    "Segment",
    "StateRefusedError",
    "StopReason",
]
