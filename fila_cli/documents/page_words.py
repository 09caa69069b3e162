"""The words of a page with their boxes, where the page shows them: from its text layer, else OCR.

Boxes are in points of the page as displayed (``page_geometry``): PyMuPDF reports text in the
unrotated page's space, relative to the crop box, so each box is mapped through
``page.rotation_matrix``. A word keeps one box per character, so that a match can start or end
inside a word (a date followed by a full stop) and be boxed as exactly as ``search_for`` boxes it.

Scanned pages and images have no text layer. When Tesseract's language data is installed (the
``tesseract-ocr`` system package), they are read with PyMuPDF's built-in OCR
(``page.get_textpage_ocr``): no Python package beyond PyMuPDF is needed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pymupdf

from fila_cli.documents.document import Document

Box = tuple[float, float, float, float]

# What PyMuPDF keeps: ligatures and whitespace as written, text clipped to the page; no images.
TEXT_FLAGS = pymupdf.TEXTFLAGS_RAWDICT & ~pymupdf.TEXT_PRESERVE_IMAGES & ~pymupdf.TEXT_CID_FOR_UNKNOWN_UNICODE
OCR_TEXT_FLAGS = TEXT_FLAGS
# OCR resolution: Tesseract reads ordinary print best at about 300 dpi.
OCR_DPI = 300
OCR_LANGUAGE = "eng"
NO_TEXT_LAYER = "no text layer"
UNREADABLE_TEXT = "text layer unreadable"
# A text layer with more than this share of characters MuPDF cannot map to Unicode is no text layer.
UNKNOWN_CHARACTER = "\ufffd"
ILLEGIBLE_SHARE = 0.5
# Two pieces of text are on one line when their heights overlap by half, the second to the right
# of the first (a little overlap allowed, in heights: kerning and OCR jitter).
SAME_LINE_OVERLAP = 0.5
SAME_LINE_BACKSTEP = 0.2
OCR_HINT = "install Tesseract OCR (the tesseract-ocr package: apt install tesseract-ocr, brew install tesseract) to read scanned pages"


@dataclass(frozen=True)
class PageWord:
    text: str
    char_boxes: tuple[Box, ...]  # one per character of ``text``, in displayed points
    line: int  # the line's number on the page, in reading order


@dataclass(frozen=True)
class PageWords:
    """A page's words in reading order, and where they came from."""

    words: list[PageWord]
    source: str  # "text layer", "ocr" or "none"
    reason: str | None = None  # why there are none ("no text layer; install ...")


@functools.cache
def tessdata_folder() -> str | None:
    """Tesseract's language data folder, or None when Tesseract is not installed."""
    try:
        return pymupdf.get_tessdata()
    except (RuntimeError, OSError):
        return None


def page_words(document: Document, index: int, *, ocr: bool = True) -> PageWords:
    """The words of page ``index`` (0-based): its text layer, else (``ocr``) Tesseract's reading of it."""
    page = document.pdf_page(index)
    if page is not None:
        try:
            words = words_of(page)
        except (RuntimeError, ValueError) as error:  # a damaged content stream: the answer still stands
            return PageWords([], "none", f"{UNREADABLE_TEXT} ({' '.join(str(error).split())})")
        if words and _legible(words):
            return PageWords(words, "text layer")
    if not ocr:
        return PageWords([], "none", NO_TEXT_LAYER)
    tessdata = tessdata_folder()
    if tessdata is None:
        return PageWords([], "none", f"{NO_TEXT_LAYER}; {OCR_HINT}")
    try:
        words = _ocr_pdf_page(page, tessdata) if page is not None else _ocr_image_page(document, index, tessdata)
    except (RuntimeError, ValueError, OSError) as error:  # Tesseract's data damaged or incomplete (no "eng")
        return PageWords([], "none", f"{NO_TEXT_LAYER}; OCR failed ({' '.join(str(error).split())})")
    return PageWords(words, "ocr") if words else PageWords([], "none", f"{NO_TEXT_LAYER}; OCR found no text")


def _legible(words: list[PageWord]) -> bool:
    """False for a text layer that is mostly U+FFFD: fonts without a Unicode mapping (read it by OCR)."""
    chars = "".join(word.text for word in words)
    return chars.count(UNKNOWN_CHARACTER) <= ILLEGIBLE_SHARE * len(chars)


def words_of(page: pymupdf.Page, textpage: pymupdf.TextPage | None = None,
             to_displayed: pymupdf.Matrix | None = None) -> list[PageWord]:
    """The words of a PyMuPDF page (or of an OCR ``textpage`` of it), boxes in displayed points.

    ``to_displayed``: maps the text's coordinates to the displayed page (default: the page's rotation).
    """
    matrix = page.rotation_matrix if to_displayed is None else to_displayed
    shown = page.rect if to_displayed is None else None
    data = page.get_text("rawdict", flags=TEXT_FLAGS, textpage=textpage)
    raw_words: list[tuple[str, list[Box], int]] = []  # text, unrotated char boxes, line number
    line_number = -1
    for block in data["blocks"]:
        if block.get("type") != 0:
            continue
        for line in block["lines"]:
            chars = [(c["c"], tuple(c["bbox"])) for span in line["spans"] for c in span["chars"]]
            first = next((box for c, box in chars if not c.isspace()), None)
            if first is None:
                continue
            if not (raw_words and _continues(raw_words[-1][1][-1], first)):
                line_number += 1
            current: list[tuple[str, Box]] = []
            for char, box in chars + [(" ", first)]:
                if char.isspace():
                    if current:
                        raw_words.append(("".join(c for c, _ in current), [b for _, b in current], line_number))
                    current = []
                else:
                    current.append((char, box))
    words = [PageWord(text, tuple(_displayed(box, matrix) for box in boxes), line) for text, boxes, line in raw_words]
    # Text outside the crop box is in the file but not on the page as shown.
    return [word for word in words if shown is None or pymupdf.Rect(union(word.char_boxes)).intersects(shown)]


def _continues(previous: Box, first: Box) -> bool:
    """Whether a line starting with the box ``first`` goes on the line that ended with ``previous``
    (unrotated boxes): MuPDF splits a line at a wide gap, and OCR output at every few words."""
    overlap = min(previous[3], first[3]) - max(previous[1], first[1])
    height = min(previous[3] - previous[1], first[3] - first[1])
    return height > 0 and overlap >= SAME_LINE_OVERLAP * height and first[0] >= previous[2] - SAME_LINE_BACKSTEP * height


def _displayed(bbox: Box, matrix: pymupdf.Matrix) -> Box:
    rect = pymupdf.Rect(bbox) * matrix  # the bounding box of the mapped rectangle
    return rect.x0, rect.y0, rect.x1, rect.y1


def union(boxes: tuple[Box, ...] | list[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _ocr_pdf_page(page: pymupdf.Page, tessdata: str) -> list[PageWord]:
    # The page as shown (rotation applied), so that Tesseract reads it upright and its words come
    # back in displayed coordinates. (``page.get_textpage_ocr`` maps them back to the unrotated
    # page and then clips them to the rotated box, which drops most words of a rotated page.)
    return _ocr_pixmap(page.get_pixmap(dpi=OCR_DPI, colorspace=pymupdf.csRGB, alpha=False), page.rect.width, tessdata)


def _ocr_image_page(document: Document, index: int, tessdata: str) -> list[PageWord]:
    """OCR of an image page at its own resolution (its pixels are all there is), boxes in its pixels."""
    width, _ = document.page_size_points(index)
    image = document.render_page(index, 1.0).convert("RGB")
    pixmap = pymupdf.Pixmap(pymupdf.csRGB, image.width, image.height, image.tobytes(), False)
    return _ocr_pixmap(pixmap, width, tessdata)


def _ocr_pixmap(pixmap: pymupdf.Pixmap, shown_width: float, tessdata: str) -> list[PageWord]:
    """Tesseract's words on a picture of the page shown ``shown_width`` wide (points, or an image's pixels)."""
    with pymupdf.open(stream=pixmap.pdfocr_tobytes(language=OCR_LANGUAGE, tessdata=tessdata), filetype="pdf") as ocr:
        page = ocr[0]
        scale = shown_width / page.rect.width
        return words_of(page, page.get_textpage(flags=OCR_TEXT_FLAGS), pymupdf.Matrix(scale, scale))
