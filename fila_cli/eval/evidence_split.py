"""Where a benchmark question's gold answer lies: inside one crop, or across a crop boundary.

``fila eval`` splits each task's accuracy by it: the fragmentation question (does a model misread
text that its crops cut?) asked of real benchmark data. The gold answer is located on the page
with the same function as an answer's evidence (``documents.evidence``), on the canvas of the
model being scored. Only exact and normalised matches count: a partial one is not where the gold
answer is. Pages without a text layer (every image benchmark) need OCR: ``fila eval --gold-ocr``
with Tesseract installed, a second or two per question; without it their questions are counted
as "not located".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fila_cli.config import AnyresConfig
from fila_cli.documents.answer_match import PARTIAL
from fila_cli.documents.document import open_document
from fila_cli.documents.evidence import locate_answer
from fila_cli.errors import FilaError

INSIDE = "inside"
STRADDLING = "straddling"
PLACEMENTS = (INSIDE, STRADDLING)


def gold_placement(image_file: Path, golds: Sequence[str], config: AnyresConfig, *, ocr: bool = False) -> str | None:
    """"straddling" when a crop boundary cuts the first gold answer located on the page, "inside"
    when it lies within one crop; None when no gold answer is located (or the file is unreadable)."""
    try:
        with open_document(image_file) as document:
            for gold in golds:
                evidence = locate_answer(document, range(document.page_count), gold, config, ocr=ocr)
                boxes = [box for box in evidence.boxes if box.match != PARTIAL]
                if boxes:
                    return STRADDLING if any(box.straddles_crop_boundary for box in boxes) else INSIDE
    except FilaError:
        return None  # the question itself reports the unreadable file
    return None
