"""Where a benchmark question's gold answer lies: inside one crop, or across a crop boundary.

``fila eval`` splits each task's accuracy by it: the fragmentation question (does a model misread
text that its crops cut?) asked of real benchmark data. The gold answer is located on the page
with the same function as an answer's evidence (``documents.evidence``), on the canvas of the
model being scored. Only exact and normalised matches count: a partial one is not where the gold
answer is. Pages without a text layer (every image benchmark) need OCR: ``fila eval --gold-ocr``
with Tesseract installed, a second or more per image; without it their questions are counted as
"not located". Benchmarks ask several questions about one image, often in a row, so the words of
the last few images are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from fila_cli.config import AnyresConfig
from fila_cli.documents.answer_match import PARTIAL
from fila_cli.documents.document import file_sha256, open_document
from fila_cli.documents.evidence import locate_answer
from fila_cli.documents.page_words import PageWords, page_words
from fila_cli.errors import FilaError

INSIDE = "inside"
STRADDLING = "straddling"
PLACEMENTS = (INSIDE, STRADDLING)
# Pages whose words a run keeps: enough for the questions asked about one image in a row.
RECENT_PAGES = 8


class GoldLocator:
    """Locates gold answers for one eval run, keeping the words of the last few pages read."""

    def __init__(self, config: AnyresConfig, *, ocr: bool = False, capacity: int = RECENT_PAGES):
        self.config = config
        self.ocr = ocr
        self.capacity = capacity
        self._words: OrderedDict[tuple[str, int], PageWords] = OrderedDict()

    def placement(self, image_file: Path, golds: Sequence[str]) -> str | None:
        """"straddling" when a crop boundary cuts the first gold answer located on the page, "inside"
        when it lies within one crop; None when no gold answer is located (or the file is unreadable)."""
        try:
            digest = file_sha256(image_file)
            with open_document(image_file) as document:
                def words_of(index: int) -> PageWords:
                    return self._page_words(document, digest, index)

                for gold in golds:
                    evidence = locate_answer(document, range(document.page_count), gold, self.config, words_of=words_of)
                    boxes = [box for box in evidence.boxes if box.match != PARTIAL]
                    if boxes:
                        return STRADDLING if any(box.straddles_crop_boundary for box in boxes) else INSIDE
        except FilaError:
            return None  # the question itself reports the unreadable file
        except Exception:  # where the gold lies is an extra: it never costs the question
            return None
        return None

    def _page_words(self, document, digest: str, index: int) -> PageWords:
        key = (digest, index)
        if key in self._words:
            self._words.move_to_end(key)
            return self._words[key]
        words = self._words[key] = page_words(document, index, ocr=self.ocr)
        while len(self._words) > self.capacity:
            self._words.popitem(last=False)
        return words


def gold_placement(image_file: Path, golds: Sequence[str], config: AnyresConfig, *, ocr: bool = False) -> str | None:
    """``GoldLocator.placement`` for one question."""
    return GoldLocator(config, ocr=ocr).placement(image_file, golds)
