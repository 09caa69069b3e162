"""The output record: the one JSON shape ``fila ask --json``, ``fila batch`` and ``fila chat --json``
write, for an answer and for a failure (README: "The JSON contract").

Every record holds the same keys::

    file, question, answer, pages, confidence, model, timings, tokens, page_choice, warnings,
    evidence, evidence_reason, error

- answered: ``error`` is null; ``pages`` the 1-based pages the answer came from; ``confidence``
  exp(mean log-probability of the answer's tokens) or null; ``timings`` {render_s, encode_s,
  prefill_s, generate_s}; ``tokens`` {visual, prompt, generated} (chat adds visual_decoded);
  ``page_choice`` {method, detail}; ``warnings`` a list of strings; ``evidence`` where the answer
  is on the pages read, a list of {page, bbox_pt, bbox_px, text, match, crops,
  straddles_crop_boundary, source[, line_boxes_pt]} (``documents.evidence``), [] when it is not
  located, with ``evidence_reason`` saying why ("not found", "no text layer; ..."; null when found).
- failed: ``error`` is {kind, message} (kind: document, model, timeout, crash, usage, error);
  ``file``, ``question`` and ``model`` as given; every other key null (``evidence`` too).

Each command adds its own keys after these: batch ``sha256`` (of the document, null when it could
not be read); chat ``turn``, ``interrupted``, ``dropped_turns``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fila_cli.documents.evidence import Evidence
from fila_cli.documents.notices import ReadNotices
from fila_cli.documents.page_select import METHOD_ALL
from fila_cli.errors import FilaError
from fila_cli.qa.timings import Timings

# Confidence is rounded in records to this many digits.
CONFIDENCE_DIGITS = 6

# The keys every record holds, in the order they are written.
RECORD_KEYS = ("file", "question", "answer", "pages", "confidence", "model", "timings", "tokens", "page_choice",
               "warnings", "evidence", "evidence_reason", "error")


@dataclass
class Answer:
    file: str
    question: str
    answer: str
    pages: list[int]  # 1-based pages the answer came from
    confidence: float | None  # exp(mean log-probability of the answer's tokens), 0..1
    model: str
    timings: Timings
    tokens: dict[str, int]
    page_reason: str = ""  # why these pages were read, in words
    page_method: str = METHOD_ALL  # how: page_select.METHOD_* ("--pages", "text-layer BM25", ...)
    warnings: list[str] = field(default_factory=list)  # the document was damaged, partly unreadable...
    # What MuPDF said about the pages read (rendered now, or cached with their tokens): the caller
    # turns it into ``warnings`` with what it said opening the document.
    notices: ReadNotices = field(default_factory=ReadNotices, repr=False)
    # Where the answer is on the pages read; None when it was not looked for (the record says null).
    evidence: Evidence | None = None

    def to_json(self) -> dict[str, Any]:
        """The record of this answer (``answer_record``)."""
        return answer_record(self)


def rounded_confidence(confidence: float | None) -> float | None:
    return None if confidence is None else round(confidence, CONFIDENCE_DIGITS)


def answer_record(answer: Answer) -> dict[str, Any]:
    """The record of an answer."""
    return {
        "file": answer.file,
        "question": answer.question,
        "answer": answer.answer,
        "pages": list(answer.pages),
        "confidence": rounded_confidence(answer.confidence),
        "model": answer.model,
        "timings": answer.timings.to_json(),
        "tokens": dict(answer.tokens),
        "page_choice": {"method": answer.page_method, "detail": answer.page_reason},
        "warnings": list(answer.warnings),
        **evidence_fields(answer.evidence),
        "error": None,
    }


def evidence_fields(evidence: Evidence | None) -> dict[str, Any]:
    """The record's ``evidence`` and ``evidence_reason`` (both null when not looked for)."""
    return {"evidence": None, "evidence_reason": None} if evidence is None else evidence.to_json()


def failed_record(file: str | Path, question: str, model: str, kind: str, message: str,
                  **extra: Any) -> dict[str, Any]:
    """The record of a question that got no answer: what was asked, and why it failed."""
    record: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    record.update(file=str(file), question=question, model=model, error={"kind": kind, "message": message})
    return {**record, **extra}


def error_of(error: BaseException, file: str | Path,
             known: tuple[type[BaseException], ...] = (FilaError,)) -> tuple[str, str]:
    """(kind, message) of a failure: fila's own errors (``known``, each with a ``kind``) say theirs;
    anything else is a bug, named so."""
    if isinstance(error, known):
        return str(getattr(error, "kind", "error")), str(error)
    return "error", f"{file}: unexpected {type(error).__name__}: {error}"



def chat_record(answer: Answer | dict[str, Any], turn: int | None, interrupted: bool | None,
                dropped_turns: int | None) -> dict[str, Any]:
    """A ``fila chat --json`` line: the record of the answer (or the failed record), then the turn's
    number, whether it was stopped, and how many old turns were dropped to make room (all three
    null in a failed record)."""
    record = answer_record(answer) if isinstance(answer, Answer) else answer
    return {**record, "turn": turn, "interrupted": interrupted, "dropped_turns": dropped_turns}
