"""The GGUF language model, driven by llama.cpp through llama-cpp-python (DESIGN §5).

A prompt is a list of *segments*: ``str`` (text, tokenised with special tokens parsed) or a
float32 array ``[n, n_embd]`` of embeddings (the visual tokens). Text goes through the
high-level ``Llama.eval``; embeddings go in as rows of ``llama_batch.embd``, ``n_batch`` rows at a
time, copied with ``ctypes.memmove``. After every embedding chunk the ``Llama`` object's own
bookkeeping (``n_tokens``, ``input_ids``) is advanced, because ``Llama.eval`` starts by removing
every KV-cache cell at or beyond ``n_tokens``: without it the next eval would erase the image.

    backend = LlamaBackend("model.gguf", n_ctx=4096)
    answer = backend.generate([before, visual_tokens, after], SamplingParams(max_tokens=64))
    print(answer.text, answer.mean_logprob)

``Llama.scores`` is not filled when ``logits_all=False``, so the log-probabilities of the answer
are read from ``llama_get_logits_ith`` after each decode.

Several prompts can be answered side by side (``generate_many``, with ``LlamaSettings.n_seq_max``
> 1): each is prefilled into its own sequence id, then one ``llama_decode`` a step carries the next
token of every unfinished answer. That path drives llama.cpp's batch directly (sequence ids and
positions of its own) and leaves the ``Llama`` object's bookkeeping at an empty context.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import llama_cpp
import numpy as np

from fila_cli.errors import ModelError
from fila_cli.gguf_files import CLIP_ARCHITECTURE, GGUFHeader, read_gguf_header, require_gguf
from fila_cli.llm.sampling import SamplingParams, TextCallback, TextStream, log_softmax_at


class StateRefusedError(ModelError):
    """llama.cpp would not restore a saved state (saved by another build or context settings)."""


# One prompt segment: text, or embedding rows [n, n_embd] (float32).
Segment = str | np.ndarray
StopReason = Literal["eos", "max_tokens", "context_full"]

# ``input_ids`` entry for a position filled from embeddings. Never a real token id, so the
# prefix matching of ``Llama.generate(reset=True)`` can never mistake an image for cached text.
IMAGE_PLACEHOLDER_ID = -1
ALL_LAYERS = -1  # llama-cpp-python's n_gpu_layers for "offload every layer"
# llama_decode return code: no KV-cache slot for the batch (context full).
DECODE_NO_KV_SLOT = 1
TOKEN_PIECE_BUFFER = 64  # bytes; llama_token_to_piece asks for more when a piece is longer
# Architectures that are GGUF files of this project but not language models.
NOT_LLM_ARCHITECTURES = {CLIP_ARCHITECTURE: "a vision projector (mmproj)"}
# Sampling knobs of llama-cpp-python that fila leaves neutral (only temperature/top_p are exposed).
NEUTRAL_SAMPLER = dict(top_k=0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)


@dataclass(frozen=True)
class LlamaSettings:
    """How llama.cpp runs the model: batch sizes, attention kernel, threads.

    The defaults are for a page's ~2,300 visual tokens on a 7B model (README "Speed";
    ``benchmarks/llm_prefill.py`` measures them): llama.cpp's own defaults for the batch sizes (fila
    used to pass 512 for both), and its fused attention, which llama.cpp enables by default but
    llama-cpp-python switches off unless asked."""

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


class ContextOverflowError(ModelError):
    """The prompt (text + visual tokens) does not fit in the model's context: a limit of the model
    (exit 4), not a bad option."""

    def __init__(self, message: str, *, n_needed: int, n_ctx: int):
        super().__init__(message)
        self.n_needed = n_needed
        self.n_ctx = n_ctx


@dataclass
class Generation:
    """One answer and what it cost."""

    text: str
    n_prompt_tokens: int  # text tokens of the prompt (BOS included)
    n_visual_tokens: int  # embedding rows of the prompt
    n_generated: int  # answer tokens (the end-of-generation token not counted)
    # Mean natural-log probability of the sampled tokens under the model's raw distribution
    # (before temperature/top_p), the end-of-generation token included when one was sampled:
    # the model's confidence in the answer *and* in stopping there.
    mean_logprob: float
    prefill_s: float
    generate_s: float
    token_ids: list[int]
    stop_reason: StopReason
    # Seconds from the end of the prefill to the first sampled token (its text may be streamed
    # later: a piece of a UTF-8 character waits for the rest); nan when nothing was sampled.
    first_token_s: float = float("nan")


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


@dataclass
class DecodeStats:
    """Positions this backend decoded over its lifetime (tests and benchmarks count reuse with it)."""

    text_tokens: int = 0  # prompt text tokens (generated tokens not counted)
    embedding_rows: int = 0  # visual tokens


# --- llama.cpp logging ---------------------------------------------------------------------------

_log_verbose = False


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # Called from C for every llama.cpp/ggml log line: dropped unless --verbose.
    if _log_verbose and text:
        sys.stderr.write(text.decode("utf-8", errors="replace"))
        sys.stderr.flush()


def _install_log_callback(verbose: bool) -> None:
    """Route llama.cpp's (and ggml's) log through ``_llama_log``. The callback is a module
    global, so ctypes' trampoline is never garbage-collected while C may call it."""
    global _log_verbose
    _log_verbose = verbose
    llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))


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


class _ParallelLlama(llama_cpp.Llama):
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


@dataclass
class _Answering:
    """One sequence of ``generate_many`` while it is answered."""

    seq: int  # llama.cpp sequence id
    pieces: list[np.ndarray]
    sampler: object  # llama-cpp-python's LlamaSampler: this sequence's own chain and random state
    stream: TextStream
    n_past: int = 0  # positions decoded
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop: StopReason | None = None  # None while it goes on
    prefill_s: float = 0.0
    first_token_s: float = float("nan")
    generate_s: float = 0.0


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
    ):
        """lora_path: a GGUF LoRA adapter (as ``fila train`` stage 2 writes), applied through
        llama.cpp's adapter API on top of the model. settings: batch sizes, flash attention and
        threads (default ``LlamaSettings()``); ``n_batch`` / ``n_threads`` override its fields."""
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
        # Past its training a model's positions are out of distribution: never run it there.
        if self.n_ctx_train is not None and n_ctx > self.n_ctx_train:
            n_ctx = self.n_ctx_train
        if lora_path is not None:
            _check_gguf(Path(lora_path))
        if settings.n_seq_max < 1:
            raise ValueError(f"n_seq_max must be at least 1 (got {settings.n_seq_max})")
        _install_log_callback(verbose)
        parallel = settings.n_seq_max > 1
        make_llama = partial(_ParallelLlama, n_seq_max=settings.n_seq_max) if parallel else llama_cpp.Llama
        try:
            self._llm = make_llama(
                str(self.path),
                # n_ctx is per prompt: with several sequences llama.cpp splits its context among them.
                n_ctx=n_ctx * settings.n_seq_max,
                n_batch=settings.n_batch,
                n_ubatch=settings.n_ubatch,
                flash_attn=settings.flash_attn,
                n_gpu_layers=_default_gpu_layers() if n_gpu_layers is None else n_gpu_layers,
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
        # llama.cpp rounds its context up (to a multiple of 256), but Llama.input_ids holds only
        # the n_ctx asked for: the smaller is the real limit (per sequence with several).
        n_ctx_seq = llama_cpp.llama_n_ctx_seq(self._llm.ctx) if parallel else self._llm.n_ctx()
        self._n_ctx = min(n_ctx_seq, n_ctx)
        self._counts = _PromptCounts()
        self.stats = DecodeStats()
        # One embedding batch for the backend's lifetime: n_batch rows of n_embd floats, 1 sequence.
        self._embd_batch = llama_cpp.llama_batch_init(self._n_batch, self._n_embd, 1)
        self._embd_batch_seq = -1
        self._set_embd_batch_sequence(0)
        self._free_batch = weakref.finalize(self, llama_cpp.llama_batch_free, self._embd_batch)
        # Token ids for generate_many, any sequence: a prompt chunk, or one token of each sequence.
        self._token_batch = llama_cpp.llama_batch_init(max(self._n_batch, settings.n_seq_max), 0, 1)
        self._free_token_batch = weakref.finalize(self, llama_cpp.llama_batch_free, self._token_batch)

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
        """Positions one prompt and its answer may fill (per sequence with ``n_seq_max`` > 1)."""
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
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def model_name(self) -> str:
        return self._llm.metadata.get("general.name") or self.path.stem

    @property
    def chat_template(self) -> str | None:
        return self._llm.metadata.get("tokenizer.chat_template") or None

    @property
    def eos(self) -> int:
        return self._llm.token_eos()

    @property
    def bos(self) -> int:
        return self._llm.token_bos()

    def token_text(self, token: int) -> str:
        """The vocabulary entry of ``token`` (e.g. "<s>"), for chat templates that name it."""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

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
        ptr = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        if not ptr:
            raise RuntimeError("no logits available: nothing was decoded with logits requested")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    # -- decoding the prompt --

    def reset(self) -> None:
        """Forget everything decoded (the next decode starts at position 0)."""
        self._llm.reset()
        self._remove_kv_from(0)
        self._counts = _PromptCounts()

    def prefill(self, segments: Sequence[Segment], *, append: bool = False) -> None:
        """Decode a prompt. Without ``append`` the context is reset first and BOS may open the
        prompt (only when its first segment is text); with it, decoding continues at ``n_past``."""
        if not append:
            self.reset()
        pieces = self._prepare(segments, at_start=self._llm.n_tokens == 0)
        self._check_fits(pieces)
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

    def _prepare(self, segments: Sequence[Segment], *, at_start: bool) -> list[np.ndarray]:
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

    def _check_fits(self, pieces: Sequence[np.ndarray]) -> None:
        n_visual = sum(len(p) for p in pieces if p.dtype == np.float32)
        n_text = sum(len(p) for p in pieces) - n_visual
        n_needed = self._llm.n_tokens + n_text + n_visual
        if n_needed > self.n_ctx:
            raise self._overflow(n_needed, f"{n_visual} visual + {n_text} text tokens")

    def _overflow(self, n_needed: int, detail: str) -> ContextOverflowError:
        if self.n_ctx_train is not None and self.n_ctx >= self.n_ctx_train:
            limit = f"the model's context holds {self.n_ctx} (what it was trained on)"
        else:
            limit = f"the model's context holds {self.n_ctx} (the bundle's n_ctx)"
        return ContextOverflowError(
            f"{self.path}: the prompt needs {n_needed} tokens ({detail}, {self._llm.n_tokens} already decoded) but "
            f"{limit}; use a model with a longer context, or read fewer or smaller pages (--pages)",
            n_needed=n_needed,
            n_ctx=self.n_ctx,
        )

    def _decode_tokens(self, tokens: list[int]) -> None:
        try:
            self._llm.eval(tokens)  # chunks of n_batch; advances n_tokens/input_ids itself
        except RuntimeError as e:
            raise ModelError(f"{self.path}: llama.cpp failed to decode the prompt ({e})") from e

    def _set_embd_batch_sequence(self, seq: int) -> None:
        # Every row belongs to one sequence (0 but in generate_many), set only when it changes:
        # otherwise only embd, pos and logits change between calls.
        if seq == self._embd_batch_seq:
            return
        batch = self._embd_batch
        ones = np.ones(self._n_batch, dtype=np.int32)
        ctypes.memmove(batch.n_seq_id, ones.ctypes.data, ones.nbytes)
        for row in range(self._n_batch):
            batch.seq_id[row][0] = seq
        self._embd_batch_seq = seq

    def _decode_embeddings(self, rows: np.ndarray, *, logits_last: bool) -> None:
        """Decode embedding rows [n, n_embd] at positions n_past.., n_batch rows a call."""
        self._set_embd_batch_sequence(0)
        batch = self._embd_batch
        n_rows = len(rows)
        for start in range(0, n_rows, self._n_batch):
            chunk = rows[start : start + self._n_batch]  # contiguous: a slice of C-ordered rows
            n = len(chunk)
            n_past = self._llm.n_tokens
            self._load_embd_chunk(chunk, n_past, logits_last=logits_last and start + n == n_rows)
            self._remove_kv_from(n_past)
            rc = llama_cpp.llama_decode(self._llm.ctx, batch)
            if rc == DECODE_NO_KV_SLOT:
                raise self._overflow(n_past + n_rows - start, f"{n_rows} visual tokens")
            if rc != 0:
                raise ModelError(f"{self.path}: llama.cpp failed to decode the visual tokens (llama_decode returned {rc})")
            # Tell the high-level object what now sits at these positions (see module docstring).
            self._llm.input_ids[n_past : n_past + n] = IMAGE_PLACEHOLDER_ID
            self._llm.n_tokens = n_past + n

    def _load_embd_chunk(self, chunk: np.ndarray, n_past: int, *, logits_last: bool) -> None:
        """Put embedding rows [n <= n_batch, n_embd] into the embedding batch at positions n_past..,
        logits for the last row only when ``logits_last``."""
        batch, n = self._embd_batch, len(chunk)
        positions = np.arange(n_past, n_past + n, dtype=np.int32)
        ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
        ctypes.memmove(batch.pos, positions.ctypes.data, positions.nbytes)
        ctypes.memset(batch.logits, 0, n)
        batch.logits[n - 1] = logits_last
        batch.n_tokens = n

    def _remove_kv_from(self, position: int) -> None:
        memory = llama_cpp.llama_get_memory(self._llm.ctx)
        if memory is not None:
            llama_cpp.llama_memory_seq_rm(memory, -1, position, -1)

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
        """Restore a snapshot of ``save_state`` (of this model, possibly from another process)."""
        if state.n_tokens > self.n_ctx:
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
        self._llm._requires_eval = True  # the logits came from a restore, not a live decode
        self._remove_kv_from(self._llm.n_tokens)
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

    # -- several prompts side by side --

    def prompt_size(self, segments: Sequence[Segment]) -> int:
        """Positions the prompt fills from the start of a context (text tokens, BOS included, and
        embedding rows): it fits when this is at most ``n_ctx``."""
        return sum(len(piece) for piece in self._prepare(segments, at_start=True))

    def generate_many(self, prompts: Sequence[Sequence[Segment]], params: SamplingParams | None = None) -> list[Generation]:
        """Answer up to ``n_seq_max`` prompts together, one ``Generation`` each, in order.

        Each prompt is prefilled into its own sequence, in its own KV cache, one after another (a
        page's rows already fill a decode), and its first token is sampled from that prefill. Then
        every step is ONE ``llama_decode`` carrying the last token of each unfinished answer at its
        own position. Each answer stops on its own (end of generation, ``max_tokens``, its context
        full), exactly as ``generate`` stops, and the others go on.

        Sampling: each sequence has its own sampler chain, built as ``generate`` builds it, seeded
        with ``params.seed``. An answer is ``generate``'s for the prompt alone wherever the logits
        are: its prompt is decoded as alone, so its first token and that token's log-probability are
        exactly the same. A later step computes the sequence's row in a several-token batch, which
        llama.cpp may compute with other kernels than a one-token step: without flash attention the
        logits agree to rounding (1e-5 on the tests' tiny models, after 2,448 rows too); with flash
        attention on a CPU the attention of several queries runs another kernel than one query's, and
        the logits drift apart with the context (1e-3 after 50 positions, 0.04 after 2,448 random
        rows, up to 0.5 with its pages' visual tokens, on the tiny test bundle's LLM). Greedy answers are the same
        unless two candidates are that close; with temperature > 0 the random draws are the same, and
        a token differs only when a draw falls that close to the boundary between two tokens. A
        single prompt (one sequence a step) is decoded exactly as ``generate`` decodes it.

        Times, as ``generate``'s fields hold them: ``prefill_s`` is this prompt's own prefill (the
        prefills run one after another, so they add up to the group's); ``first_token_s`` the
        sampling of its first token after that prefill; ``generate_s`` that sampling plus the shared
        steps until this answer stopped. The steps serve every unfinished answer at once, so the
        answers' ``generate_s`` overlap: the group's generation took the largest, not their sum.

        A prompt that cannot fit ``n_ctx`` raises ``ContextOverflowError`` before anything is decoded.
        The prompts share no prefix store: the context is empty before and after.
        """
        params = params or SamplingParams()
        if len(prompts) > self.n_seq_max:
            raise ValueError(f"{len(prompts)} prompts but this backend decodes at most {self.n_seq_max} together "
                             "(LlamaSettings.n_seq_max)")
        if not prompts:
            return []
        self.reset()
        prepared = [self._prepare(segments, at_start=True) for segments in prompts]
        for pieces in prepared:
            self._check_fits(pieces)  # every prompt, before any decoding
        answering: list[_Answering] = []
        try:
            for seq, pieces in enumerate(prepared):
                self._llm.set_seed(params.seed)  # the seed _init_sampler gives the chain's random draws
                sampler = self._llm._init_sampler(temp=params.temperature, top_p=params.top_p, **NEUTRAL_SAMPLER)
                answering.append(_Answering(seq, pieces, sampler, TextStream()))
            for sequence in answering:
                self._prefill_sequence(sequence)
                started = time.perf_counter()
                self._take(sequence, self._sample_row(sequence, -1), params)
                sequence.first_token_s = sequence.generate_s = time.perf_counter() - started
            steps_started = time.perf_counter()
            while unfinished := [s for s in answering if s.stop is None]:
                self._decode_step(unfinished)
                for row, sequence in enumerate(unfinished):
                    self._take(sequence, self._sample_row(sequence, row), params)
                    if sequence.stop is not None:
                        sequence.generate_s += time.perf_counter() - steps_started
        except RuntimeError as e:
            raise ModelError(f"{self.path}: llama.cpp failed while generating ({e})") from e
        finally:
            for sequence in answering:
                sequence.sampler.close()
            self.reset()  # no sequence's cells left behind for the next single-prompt call
        return [self._generation(sequence) for sequence in answering]

    def _prefill_sequence(self, sequence: _Answering) -> None:
        """Decode a prompt's pieces into its sequence from position 0, chunked as ``prefill`` chunks
        them (n_batch rows a call, logits for each chunk's last row), then wait for the result."""
        started = time.perf_counter()
        for i, piece in enumerate(sequence.pieces):
            is_embedding = piece.dtype == np.float32
            for start in range(0, len(piece), self._n_batch):
                chunk = piece[start : start + self._n_batch]
                last_chunk = i == len(sequence.pieces) - 1 and start + len(chunk) == len(piece)
                if is_embedding:
                    self._set_embd_batch_sequence(sequence.seq)
                    self._load_embd_chunk(chunk, sequence.n_past, logits_last=last_chunk)
                    batch = self._embd_batch
                else:
                    batch = self._token_batch
                    for row, token in enumerate(chunk.tolist()):  # logits for the last row, as Llama.eval asks
                        self._set_token_row(row, token, sequence.n_past + row, sequence.seq, logits=row == len(chunk) - 1)
                    batch.n_tokens = len(chunk)
                self._decode_batch(batch, "the prompt")
                sequence.n_past += len(chunk)
            if is_embedding:
                self.stats.embedding_rows += len(piece)
            else:
                self.stats.text_tokens += len(piece)
        llama_cpp.llama_synchronize(self._llm.ctx)  # as prefill: the prefill's whole cost
        sequence.prefill_s = time.perf_counter() - started

    def _decode_step(self, unfinished: Sequence[_Answering]) -> None:
        """One llama_decode: row i holds the last sampled token of ``unfinished[i]`` at its position."""
        for row, sequence in enumerate(unfinished):
            self._set_token_row(row, sequence.tokens[-1], sequence.n_past, sequence.seq, logits=True)
        self._token_batch.n_tokens = len(unfinished)
        self._decode_batch(self._token_batch, "the answers")
        for sequence in unfinished:
            sequence.n_past += 1

    def _set_token_row(self, row: int, token: int, position: int, seq: int, *, logits: bool) -> None:
        batch = self._token_batch
        batch.token[row] = token
        batch.pos[row] = position
        batch.n_seq_id[row] = 1
        batch.seq_id[row][0] = seq
        batch.logits[row] = logits

    def _decode_batch(self, batch: llama_cpp.llama_batch, what: str) -> None:
        rc = llama_cpp.llama_decode(self._llm.ctx, batch)
        if rc != 0:  # DECODE_NO_KV_SLOT cannot happen: every prompt was checked against its own cache
            raise ModelError(f"{self.path}: llama.cpp failed to decode {what} (llama_decode returned {rc})")

    def _sample_row(self, sequence: _Answering, row: int) -> int:
        """Sample ``sequence``'s next token from the logits of the last decode's ``row`` (-1: its last)
        with its own chain (which also takes the token into its history), and keep its log-probability."""
        token = int(llama_cpp.llama_sampler_sample(sequence.sampler.sampler, self._llm.ctx, row))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._llm.ctx, row), shape=(self._n_vocab,))
        sequence.logprobs.append(log_softmax_at(logits, token))
        return token

    def _take(self, sequence: _Answering, token: int, params: SamplingParams) -> None:
        """A sampled token, and whether the answer stops there: ``_sample``'s rules, in its order."""
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            sequence.stop = "eos"
            return
        sequence.tokens.append(token)
        sequence.stream.push(self.token_bytes(token))
        if len(sequence.tokens) >= params.max_tokens:
            sequence.stop = "max_tokens"
        elif sequence.n_past + 1 > self.n_ctx:  # no room to decode this token
            sequence.stop = "context_full"

    def _generation(self, sequence: _Answering) -> Generation:
        sequence.stream.close()
        n_visual = sum(len(p) for p in sequence.pieces if p.dtype == np.float32)
        return Generation(
            text=sequence.stream.text,
            n_prompt_tokens=sum(len(p) for p in sequence.pieces) - n_visual,
            n_visual_tokens=n_visual,
            n_generated=len(sequence.tokens),
            mean_logprob=float(np.mean(sequence.logprobs)) if sequence.logprobs else float("nan"),
            prefill_s=sequence.prefill_s,
            generate_s=sequence.generate_s,
            token_ids=list(sequence.tokens),
            stop_reason=sequence.stop or "max_tokens",
            first_token_s=sequence.first_token_s,
        )

    def _sample(self, params: SamplingParams, on_text: TextCallback | None, *, prefill_s: float) -> Generation:
        started = time.perf_counter()
        stream = TextStream(on_text)
        tokens: list[int] = []
        logprobs: list[float] = []
        stop: StopReason = "max_tokens"
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
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    stop = "eos"
                    break
                tokens.append(token)
                stream.push(self.token_bytes(token))
                if len(tokens) >= params.max_tokens:
                    break
                if self._llm.n_tokens + 1 > self.n_ctx:  # no room to decode this token
                    stop = "context_full"
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
            stop_reason=stop,
            first_token_s=first_token_s,
        )

    # -- lifetime --

    def close(self) -> None:
        self._free_batch()
        self._free_token_batch()
        self._llm.close()

    def __enter__(self) -> LlamaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "ContextOverflowError",
    "DecodeStats",
    "Generation",
    "LlamaBackend",
    "LlamaSettings",
    "PrefixState",
    "Segment",
]
