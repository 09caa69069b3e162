"""Which page's answer wins when pages are read one by one: the most confident one.

A page's confidence is exp(mean log-probability of its answer's tokens), 0..1: the one confidence
every record (ask, batch, chat, eval) reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fila_cli.documents.notices import ReadNotices

if TYPE_CHECKING:
    from fila_cli.llm import Generation


def confidence(mean_logprob: float) -> float | None:
    """exp(mean log-probability) of an answer's tokens; None when there is none (no token)."""
    return math.exp(mean_logprob) if math.isfinite(mean_logprob) else None


@dataclass
class PageAnswer:
    """One page's answer, before the best one is chosen."""

    page: int  # 0-based
    text: str
    mean_logprob: float
    visual_tokens: int
    prompt_tokens: int
    generated_tokens: int
    notices: ReadNotices

    @classmethod
    def of(cls, page: int, visual_tokens: int, generation: Generation, notices: ReadNotices) -> PageAnswer:
        return cls(page, generation.text, generation.mean_logprob, visual_tokens, generation.n_prompt_tokens,
                   generation.n_generated, notices)

    @property
    def tokens(self) -> dict[str, int]:
        return {"visual": self.visual_tokens, "prompt": self.prompt_tokens, "generated": self.generated_tokens}


def best_page(answers: Sequence[PageAnswer], reason: str) -> tuple[PageAnswer, str]:
    """The most confident answer (the only one, for one page) and ``reason`` saying so."""
    best = max(answers, key=lambda a: a.mean_logprob)
    if len(answers) > 1:
        reason += f"; page {best.page + 1} gave the most confident answer"
    return best, reason
