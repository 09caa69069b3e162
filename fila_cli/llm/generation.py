"""What answering a prompt returns, and the one rule that says when an answer stops.

``LlamaBackend.generate`` (one prompt) and ``generate_many`` (several side by side) both sample a
token at a time and ask ``stop_after`` after each, so the two paths stop alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StopReason = Literal["eos", "max_tokens", "context_full"]


def stop_after(*, is_end: bool, n_answer: int, n_decoded: int, max_tokens: int, n_ctx: int) -> StopReason | None:
    """Why the answer stops at the token just sampled, or None while it goes on.

    is_end: the token ends generation (an end-of-generation token: not part of the answer).
    n_answer: answer tokens, this one included when it is not the end.
    n_decoded: positions already in the context (the sampled token is not yet decoded).
    """
    if is_end:
        return "eos"
    if n_answer >= max_tokens:
        return "max_tokens"
    if n_decoded + 1 > n_ctx:  # no room to decode this token
        return "context_full"
    return None


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
class DecodeStats:
    """Positions a backend decoded over its lifetime (tests and benchmarks count reuse with it)."""

    text_tokens: int = 0  # prompt text tokens (generated tokens not counted)
    embedding_rows: int = 0  # visual tokens
