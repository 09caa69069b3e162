"""Evidence: where on the page an answer is, and whether a crop boundary cuts it.

``locate_answer`` finds an answer (or any text) on the pages read, in the page's words (its text
layer, else OCR; ``page_words``), by exact, normalised or partial match (``answer_match``), and
boxes it in points of the page as shown and in pixels of the page as fila renders it for the
ViT canvas. From that canvas's geometry it says which crops each box touches: a box that a crop
boundary cuts *straddles* it, the case FILA's whole-page ConvNeXt branch exists for.

A located string is where that text is on the page, not proof that the model read it there.

    evidence = locate_answer(document, [1], "2,510.40 GBP", AnyresConfig())
    record.update(evidence.to_json())   # {"evidence": [{page, bbox_pt, bbox_px, ...}], "evidence_reason": None}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fila_cli.config import AnyresConfig
from fila_cli.documents.answer_match import EXACT, NORMALISED, PARTIAL, AnswerMatch, find_answer
from fila_cli.documents.canvas import CanvasGeometry
from fila_cli.documents.document import Document
from fila_cli.documents.page_geometry import Box, PageGeometry, document_page_geometry
from fila_cli.documents.page_words import PageWord, PageWords, page_words, union

NOT_FOUND = "not found"
# Boxes reported at most: an answer such as "1" may be on a page dozens of times.
MAX_EVIDENCE = 20
# Better matches first: only the best kind found on any page read is reported.
MATCH_RANK = {EXACT: 0, NORMALISED: 1, PARTIAL: 2}
COORDINATE_DECIMALS = 2


@dataclass(frozen=True)
class EvidenceBox:
    """One place on one page where the answer is written."""

    page: int  # 1-based
    bbox_pt: Box  # points of the page as shown (rotation and crop box applied), origin top-left
    bbox_px: Box  # pixels of the page as rendered for the ViT canvas (``fila crops`` without fusion)
    text: str  # the page's text there
    match: str  # exact, normalised or partial
    crops: tuple[int, ...]  # row-major indices of the crops it touches
    straddles_crop_boundary: bool  # a crop boundary cuts one of its lines
    line_boxes_pt: tuple[Box, ...]  # one box per line the text runs over (one, mostly)
    source: str  # "text layer" or "ocr"

    def to_json(self) -> dict[str, Any]:
        record = {"page": self.page, "bbox_pt": _rounded(self.bbox_pt), "bbox_px": _rounded(self.bbox_px),
                  "text": self.text, "match": self.match, "crops": list(self.crops),
                  "straddles_crop_boundary": self.straddles_crop_boundary, "source": self.source}
        if len(self.line_boxes_pt) > 1:
            record["line_boxes_pt"] = [_rounded(box) for box in self.line_boxes_pt]
        return record

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvidenceBox:
        """The box a record's ``evidence`` item holds (``to_json``'s inverse, to its rounding)."""
        lines = data.get("line_boxes_pt") or [data["bbox_pt"]]
        return cls(page=data["page"], bbox_pt=tuple(data["bbox_pt"]), bbox_px=tuple(data["bbox_px"]), text=data["text"],
                   match=data["match"], crops=tuple(data["crops"]),
                   straddles_crop_boundary=data["straddles_crop_boundary"],
                   line_boxes_pt=tuple(tuple(box) for box in lines), source=data["source"])


@dataclass(frozen=True)
class Evidence:
    """Where an answer is on the pages read: boxes, or none and why (``reason``)."""

    boxes: tuple[EvidenceBox, ...]
    reason: str | None  # None when found; "not found", or "no text layer[; what to install]"

    @property
    def straddles_crop_boundary(self) -> bool:
        return any(box.straddles_crop_boundary for box in self.boxes)

    @property
    def straddling_pages(self) -> list[int]:
        """1-based pages where a crop boundary cuts the answer."""
        return sorted({box.page for box in self.boxes if box.straddles_crop_boundary})

    def on_page(self, page: int) -> list[EvidenceBox]:
        return [box for box in self.boxes if box.page == page]

    def to_json(self) -> dict[str, Any]:
        """The record's fields: ``evidence`` (a list, [] when not located) and ``evidence_reason``."""
        return {"evidence": [box.to_json() for box in self.boxes], "evidence_reason": self.reason}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Evidence | None:
        """The evidence a record holds; None where it holds none (a failed record, or not looked for)."""
        if record.get("evidence") is None:
            return None
        return cls(tuple(EvidenceBox.from_json(box) for box in record["evidence"]), record.get("evidence_reason"))


def locate_answer(document: Document, page_indices: Iterable[int], answer: str, config: AnyresConfig | None = None,
                  *, ocr: bool = True, max_boxes: int = MAX_EVIDENCE,
                  words_of: Callable[[int], PageWords] | None = None) -> Evidence:
    """Where ``answer`` is on the pages ``page_indices`` (0-based) of ``document``.

    ``config``: the model's anyres settings (its canvases decide where the crop boundaries fall).
    ``ocr``: read pages without a text layer with Tesseract when it is installed.
    ``words_of``: page index -> its words, for a caller that keeps them (OCR takes seconds a page).
    """
    config = config or AnyresConfig()
    words_of = words_of or (lambda index: page_words(document, index, ocr=ocr))
    pages = (locatable_page(document, index, config, words=words_of(index)) for index in page_indices)
    return locate_in_pages(pages, answer, max_boxes=max_boxes)


@dataclass(frozen=True)
class LocatablePage:
    """All that locating an answer needs of one page: its words and its geometry (None without
    words). Plain data: ``fila batch``'s document worker reads it from the untrusted file and sends
    it as JSON (``to_json``), so the parent locates answers without parsing the document."""

    index: int  # 0-based
    words: PageWords
    geometry: PageGeometry | None

    def to_json(self) -> dict[str, Any]:
        geometry = self.geometry
        return {
            "index": self.index,
            "words": [[word.text, [list(box) for box in word.char_boxes], word.line] for word in self.words.words],
            "source": self.words.source,
            "reason": self.words.reason,
            "geometry": None if geometry is None else {
                "page_size": list(geometry.page_size), "zoom": geometry.zoom,
                "canvas": {key: list(value) if isinstance(value, tuple) else value
                           for key, value in dataclasses.asdict(geometry.canvas).items()}},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LocatablePage:
        words = [PageWord(str(text), tuple(_box_of(box) for box in boxes), int(line)) for text, boxes, line in data["words"]]
        geometry = data["geometry"]
        if geometry is not None:
            canvas = CanvasGeometry(**{key: tuple(int(v) for v in value) if isinstance(value, list) else int(value)
                                       for key, value in geometry["canvas"].items()})
            geometry = PageGeometry(_pair(geometry["page_size"]), float(geometry["zoom"]), canvas)
        return cls(int(data["index"]), PageWords(words, str(data["source"]), data["reason"]), geometry)


def locatable_page(document: Document, index: int, config: AnyresConfig, *, ocr: bool = True,
                   words: PageWords | None = None) -> LocatablePage:
    """Page ``index`` (0-based) of ``document``, ready to locate answers on (``words``: already read)."""
    words = words if words is not None else page_words(document, index, ocr=ocr)
    geometry = document_page_geometry(document, index, config) if words.words else None
    return LocatablePage(index, words, geometry)


def locate_in_pages(pages: Iterable[LocatablePage], answer: str, *, max_boxes: int = MAX_EVIDENCE) -> Evidence:
    """Where ``answer`` is on ``pages``: the best kind of match found on any of them (no document needed)."""
    found: list[EvidenceBox] = []
    reasons: list[str] = []
    for page in pages:
        if not page.words.words or page.geometry is None:
            reasons.append(page.words.reason or NOT_FOUND)
            continue
        reasons.append(NOT_FOUND)
        words = page.words.words
        found += [_box(page.index, words, match, page.geometry, page.words.source) for match in find_answer(answer, words)]
    if not found:
        # "no text layer" only when no page read had text to search.
        reason = NOT_FOUND if NOT_FOUND in reasons or not reasons else reasons[0]
        return Evidence((), reason)
    best = min(MATCH_RANK[box.match] for box in found)
    return Evidence(tuple(box for box in found if MATCH_RANK[box.match] == best)[:max_boxes], None)


def _box_of(values: list) -> Box:
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1


def _pair(values: list) -> tuple[float, float]:
    first, second = (float(v) for v in values)
    return first, second


def _box(index: int, words: list[PageWord], match: AnswerMatch, geometry: PageGeometry, source: str) -> EvidenceBox:
    lines: dict[int, list[Box]] = {}
    for piece in match.pieces:
        word = words[piece.word]
        lines.setdefault(word.line, []).extend(word.char_boxes[piece.start:piece.end])
    line_boxes = tuple(union(boxes) for boxes in lines.values())
    touched = [geometry.crops_touched(box) for box in line_boxes]
    bbox = union(line_boxes)
    return EvidenceBox(index + 1, bbox, geometry.box_to_render(bbox), match.text, match.kind,
                       tuple(sorted({crop for crops in touched for crop in crops})), any(len(crops) > 1 for crops in touched),
                       line_boxes, source)


def _rounded(box: Box) -> list[float]:
    return [round(value, COORDINATE_DECIMALS) for value in box]


def crop_boundary_notice(evidence: Evidence, *, fusion: bool) -> str | None:
    """The one-line notice for stderr (and the panel) when a crop boundary cuts the answer and fusion
    is off; None otherwise (with fusion on, the ConvNeXt branch reads the whole page uncut)."""
    return straddling_notice(evidence.straddling_pages, fusion=fusion)


def straddling_notice(pages: list[int], *, fusion: bool) -> str | None:
    """``crop_boundary_notice`` from the 1-based pages where a crop boundary cuts the answer."""
    if fusion or not pages:
        return None
    where = f"page {pages[0]}" if len(pages) == 1 else "pages " + ", ".join(map(str, pages[:-1])) + f" and {pages[-1]}"
    return (f"the answer lies across a crop boundary on {where}; a model without FILA fusion may misread such text "
            "(see `fila crops`)")


__all__ = ["EXACT", "MAX_EVIDENCE", "NORMALISED", "NOT_FOUND", "PARTIAL", "Evidence", "EvidenceBox", "LocatablePage",
           "crop_boundary_notice", "locatable_page", "locate_answer", "locate_in_pages",
           "straddling_notice"]
