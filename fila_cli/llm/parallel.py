"""Several prompts answered side by side (``LlamaBackend.generate_many``, ``fila batch --parallel``).

Each prompt is prefilled into its own llama.cpp sequence, in its own KV cache (``LlamaSettings.n_seq_max``
> 1), one after another (a page's rows already fill a decode), and its first token is sampled from
that prefill. Then every step is ONE ``llama_decode`` carrying the last token of each unfinished
answer at its own position. Each answer stops on its own by ``generation.stop_after``, the rule
``LlamaBackend.generate`` follows, and the others go on.

This path drives llama.cpp's batch directly (sequence ids and positions of its own, through
``_internals``) and leaves the ``Llama`` object's bookkeeping at an empty context.

Sampling: each sequence has its own sampler chain, built as ``generate`` builds it, seeded with
``params.seed``. A prompt is decoded as it is alone, so its first token and that token's
log-probability are exactly ``generate``'s. Later steps compute a sequence's row in a several-token
batch, which llama.cpp may compute with other kernels than a one-token step: the logits then agree
to rounding, or (flash attention on a CPU) drift slightly with the context, so a greedy answer
differs only where two candidates are that close (docs/speed-and-benchmarks.md has the measured drift).

Times, as ``generate``'s fields hold them: ``prefill_s`` is this prompt's own prefill (the prefills
run one after another, so they add up to the group's); ``first_token_s`` the sampling of its first
token after that prefill; ``generate_s`` that sampling plus the shared steps until this answer
stopped. The steps serve every unfinished answer at once, so the answers' ``generate_s`` overlap:
the group's generation took the largest, not their sum.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from fila_cli.errors import ModelError
from fila_cli.llm import _internals
from fila_cli.llm.generation import Generation, StopReason, stop_after
from fila_cli.llm.sampling import SamplingParams, TextStream, log_softmax_at

if TYPE_CHECKING:
    from fila_cli.llm.backend import LlamaBackend, Segment


@dataclass
class _Answering:
    """One sequence while it is answered."""

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


def generate_many(backend: LlamaBackend, prompts: Sequence[Sequence[Segment]], params: SamplingParams) -> list[Generation]:
    """Answer up to ``backend.n_seq_max`` prompts together, one ``Generation`` each, in order.

    Every prompt is checked before anything is decoded (the context grows for the longest when it
    must and may): one that cannot fit raises ``ContextOverflowError``. The prompts share no prefix
    store: the context is empty before and after."""
    from fila_cli.llm.backend import NEUTRAL_SAMPLER

    if len(prompts) > backend.n_seq_max:
        raise ValueError(f"{len(prompts)} prompts but this backend decodes at most {backend.n_seq_max} together "
                         "(LlamaSettings.n_seq_max)")
    if not prompts:
        return []
    backend.reset()
    prepared = [backend.prepare(segments, at_start=True) for segments in prompts]
    for pieces in sorted(prepared, key=lambda p: -sum(map(len, p))):  # the longest first: it sizes the context
        backend.check_fits(pieces)
    answering: list[_Answering] = []
    try:
        for seq, pieces in enumerate(prepared):
            backend.llama.set_seed(params.seed)  # the seed init_sampler gives the chain's random draws
            sampler = _internals.init_sampler(backend.llama, temp=params.temperature, top_p=params.top_p,
                                              **NEUTRAL_SAMPLER)
            answering.append(_Answering(seq, pieces, sampler, TextStream()))
        for sequence in answering:
            _prefill_sequence(backend, sequence)
            started = time.perf_counter()
            _take(backend, sequence, _sample_row(backend, sequence, -1), params)
            sequence.first_token_s = sequence.generate_s = time.perf_counter() - started
        steps_started = time.perf_counter()
        while unfinished := [s for s in answering if s.stop is None]:
            _decode_step(backend, unfinished)
            for row, sequence in enumerate(unfinished):
                _take(backend, sequence, _sample_row(backend, sequence, row), params)
                if sequence.stop is not None:
                    sequence.generate_s += time.perf_counter() - steps_started
    except RuntimeError as e:
        raise ModelError(f"{backend.path}: llama.cpp failed while generating ({e})") from e
    finally:
        for sequence in answering:
            sequence.sampler.close()
        backend.reset()  # no sequence's cells left behind for the next single-prompt call
    return [_generation(sequence) for sequence in answering]


def _prefill_sequence(backend: LlamaBackend, sequence: _Answering) -> None:
    """Decode a prompt's pieces into its sequence from position 0, chunked as ``prefill`` chunks
    them (n_batch rows a call, logits for each chunk's last row), then wait for the result."""
    started = time.perf_counter()
    n_batch = backend.n_batch
    for i, piece in enumerate(sequence.pieces):
        is_embedding = piece.dtype == np.float32
        for start in range(0, len(piece), n_batch):
            chunk = piece[start : start + n_batch]
            last_chunk = i == len(sequence.pieces) - 1 and start + len(chunk) == len(piece)
            if is_embedding:
                batch = backend.embedding_batch
                batch.set_sequence(sequence.seq)
                batch.fill(chunk, sequence.n_past, logits_last=last_chunk)
                _decode(backend, batch, "the prompt")
            else:
                batch = backend.token_batch
                for row, token in enumerate(chunk.tolist()):  # logits for the last row, as Llama.eval asks
                    batch.set_row(row, token, sequence.n_past + row, sequence.seq, logits=row == len(chunk) - 1)
                batch.set_length(len(chunk))
                _decode(backend, batch, "the prompt")
            sequence.n_past += len(chunk)
        if is_embedding:
            backend.stats.embedding_rows += len(piece)
        else:
            backend.stats.text_tokens += len(piece)
    llama_cpp.llama_synchronize(backend.ctx)  # as prefill: the prefill's whole cost
    sequence.prefill_s = time.perf_counter() - started


def _decode_step(backend: LlamaBackend, unfinished: Sequence[_Answering]) -> None:
    """One llama_decode: row i holds the last sampled token of ``unfinished[i]`` at its position."""
    batch = backend.token_batch
    for row, sequence in enumerate(unfinished):
        batch.set_row(row, sequence.tokens[-1], sequence.n_past, sequence.seq, logits=True)
    batch.set_length(len(unfinished))
    _decode(backend, batch, "the answers")
    for sequence in unfinished:
        sequence.n_past += 1


def _decode(backend: LlamaBackend, batch, what: str) -> None:
    rc = _internals.decode(backend.ctx, batch)
    if rc != 0:  # DECODE_NO_KV_SLOT cannot happen: every prompt was checked against its own cache
        raise ModelError(f"{backend.path}: llama.cpp failed to decode {what} (llama_decode returned {rc})")


def _sample_row(backend: LlamaBackend, sequence: _Answering, row: int) -> int:
    """Sample ``sequence``'s next token from the logits of the last decode's ``row`` (-1: its last)
    with its own chain, and keep its log-probability."""
    token = _internals.sample_row(sequence.sampler, backend.ctx, row)
    logits = _internals.logits_row(backend.ctx, row, backend.n_vocab)
    sequence.logprobs.append(log_softmax_at(logits, token))
    return token


def _take(backend: LlamaBackend, sequence: _Answering, token: int, params: SamplingParams) -> None:
    """A sampled token, and whether the answer stops there (``stop_after``, as ``generate``)."""
    is_end = backend.is_end(token)
    if not is_end:
        sequence.tokens.append(token)
        sequence.stream.push(backend.token_bytes(token))
    sequence.stop = stop_after(is_end=is_end, n_answer=len(sequence.tokens), n_decoded=sequence.n_past,
                               max_tokens=params.max_tokens, n_ctx=backend.n_ctx)


def _generation(sequence: _Answering) -> Generation:
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
