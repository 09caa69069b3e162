"""Evidence for an answer: where it is on the pages it came from (``documents.evidence``), found
without ever costing the answer.

- ``fila ask`` and ``fila chat`` open the document in their own process anyway (they render it
  there), so they locate on the open document (``locate_on_document``).
- ``fila batch`` opens documents only in its isolated worker (``isolation.py``): the worker reads
  each planned page's words and geometry (``LocatablePage``, plain data sent as JSON) while the
  document is open there, and the parent matches the answer against them (``locate_on_pages``),
  so a hostile PDF can crash or hang the worker, never the batch.

OCR (Tesseract, seconds a page) runs only when asked (``AskOptions.evidence_ocr``, the CLI's
``--evidence-ocr``): a scanned page otherwise has ``evidence: []`` with a reason that says how.
A failure to locate is a reason too (``evidence: []``), never a failed record.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fila_cli.config import AnyresConfig
from fila_cli.documents.document import Document
from fila_cli.documents.evidence import (
    Evidence,
    LocatablePage,
    crop_boundary_notice,
    locate_answer,
    locate_in_pages,
    straddling_notice,
)
from fila_cli.documents.page_words import NO_TEXT_LAYER

# What an evidence reason adds when a page had no text layer and OCR was not asked for.
EVIDENCE_OCR_HINT = "pass --evidence-ocr (evidence_ocr=True) to read scanned pages with Tesseract, seconds a page"
LOCATING_FAILED = "not located"


def with_ocr_hint(evidence: Evidence, ocr: bool) -> Evidence:
    """``evidence``, its reason saying how to read a scanned page when OCR was off."""
    if not ocr and evidence.reason == NO_TEXT_LAYER:
        return Evidence((), f"{NO_TEXT_LAYER}; {EVIDENCE_OCR_HINT}")
    return evidence


def locating_failed(error: BaseException) -> Evidence:
    """No evidence, saying why: locating failed (a damaged page, a worker that gave up on it)."""
    return Evidence((), f"{LOCATING_FAILED} ({' '.join(str(error).split()) or type(error).__name__})")


def locate_on_document(document: Document, pages: Iterable[int], answer: str, config: AnyresConfig,
                       *, ocr: bool = False) -> Evidence:
    """Where ``answer`` is on the 1-based ``pages`` of an open document."""
    try:
        return with_ocr_hint(locate_answer(document, [page - 1 for page in pages], answer, config, ocr=ocr), ocr)
    except Exception as error:  # the answer stands without its evidence; the reason says what went wrong
        return locating_failed(error)


def locate_on_pages(pages: Iterable[LocatablePage], answer: str, *, ocr: bool = False) -> Evidence:
    """Where ``answer`` is on pages a worker read (``LocatablePage``)."""
    try:
        return with_ocr_hint(locate_in_pages(pages, answer), ocr)
    except Exception as error:  # malformed data from a worker: the answer stands
        return locating_failed(error)


def boundary_notice(evidence: Evidence | None, *, fusion: bool) -> str | None:
    """The crop-boundary notice for an answer's evidence (None: no notice)."""
    return None if evidence is None else crop_boundary_notice(evidence, fusion=fusion)


def record_notice(record: dict[str, Any], *, fusion: bool) -> str | None:
    """The crop-boundary notice for a written record (its ``evidence`` list), naming its file."""
    pages = sorted({box["page"] for box in record.get("evidence") or () if box.get("straddles_crop_boundary")})
    notice = straddling_notice(pages, fusion=fusion)
    return None if notice is None else f"{record['file']}: {notice}"
