"""The bad-document corpus, written at test time (no binaries in the repository).

:func:`write_corpus` writes every case into a folder and returns ``name -> Case(path, expected)``,
where ``expected`` is ``"ok"`` (opening it and rendering page 1 must work) or ``"document"`` (the
kind of the error, :class:`fila_cli.errors.DocumentError`, that must be raised instead; never
another exception). Most PDFs are written byte by byte with :func:`pdf_bytes` so the damage done
to them (truncation, bit flips, broken offsets) lands on known bytes whatever PyMuPDF version is
installed; PyMuPDF writes the ones that need its machinery (encryption, attachments).

:func:`make_good_pdf` makes a healthy multi-page PDF with text layers and, optionally, one page
that looks scanned (the text drawn as an image, with no text layer), for end-to-end tests.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Literal

import pymupdf
from PIL import Image

Expected = Literal["ok", "document"]

PASSWORD = "secret"
# Letter, in points.
PAGE_WIDTH, PAGE_HEIGHT = 612.0, 792.0
MARGIN = 72.0
FONT_SIZE = 14.0
# The scanned-style page is rasterised at this many pixels per point (144 dpi).
SCAN_SCALE = 2.0
# A 200x200-inch page.
HUGE_PAGE_POINTS = 200 * 72
# The many-pages case: pages, and the side of each (tiny pages keep writing and reading fast).
MANY_PAGES = 5000
TINY_PAGE_POINTS = 72
# The image bomb: a 1-bit square this wide decodes to ~1 gigapixel from ~120 KB of deflate data.
# (Not 32768: MuPDF subsamples that power-of-two width several times slower.)
BOMB_SIDE = 32000
# Between 1x and 2x Pillow's limit, where Pillow itself only warns.
WARNING_BOMB_SIDE = 10000
# Bit flips in the damaged PDF: how many, and the seed that places them.
BIT_FLIPS = 24
BIT_FLIP_SEED = 1234
# Rows compressed per call while writing a bomb (bounds the generator's own memory).
BOMB_ROWS_PER_CHUNK = 1024


@dataclass(frozen=True)
class Case:
    path: Path
    expected: Expected


# -- a minimal PDF writer ------------------------------------------------------------------------


def pdf_bytes(objects: list[bytes], *, xref_shift: int = 0) -> bytes:
    """A PDF whose object ``n`` (1-based) is ``objects[n - 1]``, object 1 the catalog.

    ``xref_shift`` adds a constant to every cross-reference offset (and to ``startxref``) to make a
    broken table on purpose.
    """
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % (offset + xref_shift)
    out += b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at + xref_shift)
    return bytes(out)


def _stream(dictionary: bytes, data: bytes) -> bytes:
    return b"<<" + dictionary + b"/Length %d>>\nstream\n" % len(data) + data + b"\nendstream"


def _escape_pdf_string(text: str) -> bytes:
    raw = text.encode("latin-1")
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def text_pdf_bytes(texts: list[str], *, compress: bool = True, xref_shift: int = 0) -> bytes:
    """One Letter page per string, each with its text as a real text layer (Helvetica)."""
    n = len(texts)
    font = 3 + 2 * n  # object numbers: 1 catalog, 2 page tree, then (page, content) pairs, then the font
    kids = b" ".join(b"%d 0 R" % (3 + 2 * k) for k in range(n))
    objects = [b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[%s]/Count %d>>" % (kids, n)]
    for k, text in enumerate(texts):
        content = b"BT /F1 %g Tf %g %g Td (%s) Tj ET" % (FONT_SIZE, MARGIN, PAGE_HEIGHT - MARGIN, _escape_pdf_string(text))
        if compress:
            content_obj = _stream(b"/Filter/FlateDecode", zlib.compress(content))
        else:
            content_obj = _stream(b"", content)
        objects.append(
            b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 %g %g]/Resources<</Font<</F1 %d 0 R>>>>/Contents %d 0 R>>"
            % (PAGE_WIDTH, PAGE_HEIGHT, font, 4 + 2 * k)
        )
        objects.append(content_obj)
    objects.append(b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica/Encoding/WinAnsiEncoding>>")
    return pdf_bytes(objects, xref_shift=xref_shift)


# -- healthy documents -----------------------------------------------------------------------------


def make_good_pdf(path: str | Path, pages: list[str], scanned_page: int | None = None) -> Path:
    """A Letter-size PDF with one page per string of ``pages``, each with a real text layer.

    ``scanned_page`` (0-based) is drawn instead as a picture of its text, with no text layer, like a
    scanned sheet: readable by a vision model, invisible to text extraction.
    """
    path = Path(path)
    if scanned_page is not None and not 0 <= scanned_page < len(pages):
        raise ValueError(f"scanned_page {scanned_page} is not one of the {len(pages)} pages (0-based)")
    doc = pymupdf.open()
    for index, text in enumerate(pages):
        page = doc.new_page(width=PAGE_WIDTH, height=PAGE_HEIGHT)
        if index == scanned_page:
            page.insert_image(page.rect, pixmap=_scanned_picture(text))
        else:
            _write_text(page, text)
    doc.save(path)
    doc.close()
    return path


def _write_text(page: pymupdf.Page, text: str) -> None:
    box = pymupdf.Rect(MARGIN, MARGIN, page.rect.width - MARGIN, page.rect.height - MARGIN)
    if page.insert_textbox(box, text, fontsize=FONT_SIZE, fontname="helv") < 0:
        raise ValueError(f"text does not fit on one page at {FONT_SIZE} pt: {text[:40]!r}...")


def _scanned_picture(text: str) -> pymupdf.Pixmap:
    scratch = pymupdf.open()
    page = scratch.new_page(width=PAGE_WIDTH, height=PAGE_HEIGHT)
    _write_text(page, text)
    pixmap = page.get_pixmap(matrix=pymupdf.Matrix(SCAN_SCALE, SCAN_SCALE), colorspace=pymupdf.csGRAY, alpha=False)
    scratch.close()
    return pixmap


# -- the corpus ------------------------------------------------------------------------------------

SAMPLE_TEXTS = ["Invoice 1001 total due 42.00 EUR", "Shipping address 12 Harbour Road", "Terms net 30 days"]


def write_corpus(folder: str | Path) -> dict[str, Case]:
    """Write every bad (and awkward but valid) document into ``folder``; return name -> Case."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = text_pdf_bytes(SAMPLE_TEXTS)
    bomb_rows = _bomb_deflate(BOMB_SIDE)

    def write(name: str, data: bytes, expected: Expected) -> Case:
        path = folder / name
        path.write_bytes(data)
        return Case(path, expected)

    cases = {
        # An interrupted download: the cross-reference table and trailer are gone. MuPDF rebuilds
        # them by scanning the objects, so the document still reads.
        "truncated_tail.pdf": write("truncated_tail.pdf", good[: good.index(b"xref\n")], "ok"),
        # Cut inside the first object: no page survives.
        "truncated_head.pdf": write("truncated_head.pdf", good[: good.index(b"2 0 obj")], "document"),
        # Random bits flipped inside the compressed page streams: the structure survives, MuPDF
        # draws what it can (and records warnings).
        "bit_flipped.pdf": write("bit_flipped.pdf", _flip_stream_bits(good), "ok"),
        # Every cross-reference offset (and startxref) points to the wrong byte: MuPDF repairs it.
        "broken_xref.pdf": write("broken_xref.pdf", text_pdf_bytes(SAMPLE_TEXTS, xref_shift=7), "ok"),
        "zero_pages.pdf": write("zero_pages.pdf", _zero_pages_pdf(), "document"),
        "encrypted.pdf": write("encrypted.pdf", _encrypted_pdf(), "document"),
        "huge_page.pdf": write("huge_page.pdf", _huge_page_pdf(), "ok"),
        "many_pages.pdf": write("many_pages.pdf", _many_pages_pdf(MANY_PAGES), "ok"),
        "javascript_attachment.pdf": write("javascript_attachment.pdf", _javascript_attachment_pdf(), "ok"),
        # A PNG whose 120 KB decode to a gigapixel: refused before decoding.
        "bomb.png": write("bomb.png", _png_1bit(BOMB_SIDE, bomb_rows), "document"),
        # Pillow only warns between 1x and 2x its limit; we refuse.
        "bomb_warning.png": write("bomb_warning.png", _png_1bit(WARNING_BOMB_SIDE, _bomb_deflate(WARNING_BOMB_SIDE)), "document"),
        # The same gigapixel image inside a 1-inch page: MuPDF subsamples it while decoding, so it
        # renders in bounded memory.
        "bomb_image.pdf": write("bomb_image.pdf", _bomb_pdf(BOMB_SIDE, bomb_rows), "ok"),
        "truncated.png": write("truncated.png", _truncated_png(), "document"),
        "text_named.pdf": write("text_named.pdf", b"This is a plain text file, not a PDF.\n" * 20, "document"),
        "header_only.pdf": write("header_only.pdf", b"%PDF-1.7\n", "document"),
        "empty.pdf": write("empty.pdf", b"", "document"),
    }
    return cases


def _flip_stream_bits(pdf: bytes) -> bytes:
    """Flip BIT_FLIPS seeded random bits inside the data of the PDF's streams."""
    spans = []
    start = 0
    while (begin := pdf.find(b"stream\n", start)) >= 0:
        end = pdf.index(b"\nendstream", begin)
        spans.append((begin + len(b"stream\n"), end))
        start = end + len(b"\nendstream")
    rng = random.Random(BIT_FLIP_SEED)
    data = bytearray(pdf)
    for _ in range(BIT_FLIPS):
        lo, hi = rng.choice(spans)
        data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(data)


def _zero_pages_pdf() -> bytes:
    # PyMuPDF refuses to save a document without pages, so this one is written by hand.
    return pdf_bytes([b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[]/Count 0>>"])


def _encrypted_pdf() -> bytes:
    doc = pymupdf.open(stream=text_pdf_bytes(SAMPLE_TEXTS[:1]), filetype="pdf")
    data = doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=PASSWORD, owner_pw=PASSWORD + "-owner")
    doc.close()
    return data


def _huge_page_pdf() -> bytes:
    content = b"BT /F1 400 Tf 720 %d Td (HUGE PAGE) Tj ET" % (HUGE_PAGE_POINTS - 1440)
    return pdf_bytes(
        [
            b"<</Type/Catalog/Pages 2 0 R>>",
            b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
            b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 %d %d]/Resources<</Font<</F1 5 0 R>>>>/Contents 4 0 R>>"
            % (HUGE_PAGE_POINTS, HUGE_PAGE_POINTS),
            _stream(b"", content),
            b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>",
        ]
    )


def _many_pages_pdf(count: int) -> bytes:
    # Written by hand: PyMuPDF's new_page takes seconds for thousands of pages. All pages share one
    # content stream (object 3); pages are objects 4 .. count + 3.
    kids = b" ".join(b"%d 0 R" % (4 + k) for k in range(count))
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[%s]/Count %d>>" % (kids, count),
        _stream(b"", b"0 0 1 rg 8 8 56 56 re f"),
    ]
    page = b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 %d %d]/Contents 3 0 R>>" % (TINY_PAGE_POINTS, TINY_PAGE_POINTS)
    objects.extend([page] * count)
    return pdf_bytes(objects)


def _javascript_attachment_pdf() -> bytes:
    doc = pymupdf.open(stream=text_pdf_bytes(SAMPLE_TEXTS[:1]), filetype="pdf")
    doc.embfile_add("payload.txt", b"an attached file", filename="payload.txt")
    # Runs on open in viewers that execute JavaScript; we must neither run it nor choke on it.
    doc.xref_set_key(doc.pdf_catalog(), "OpenAction", "<</S/JavaScript/JS(app.alert\\('opened'\\);)>>")
    data = doc.tobytes()
    doc.close()
    return data


def _bomb_deflate(side: int) -> bytes:
    """Deflate data of ``side`` PNG rows of a ``side``-pixel 1-bit square: a filter byte, then zero bits."""
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = []
    for first in range(0, side, BOMB_ROWS_PER_CHUNK):
        parts.append(compressor.compress(row * min(BOMB_ROWS_PER_CHUNK, side - first)))
    parts.append(compressor.flush())
    return b"".join(parts)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_1bit(side: int, deflated_rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", deflated_rows) + _png_chunk(b"IEND", b"")


def _bomb_pdf(side: int, deflated_rows: bytes) -> bytes:
    # The PNG rows are valid PDF Flate data with the PNG predictors (a filter byte per row).
    image = _stream(
        b"/Type/XObject/Subtype/Image/Width %d/Height %d/ColorSpace/DeviceGray/BitsPerComponent 1/Decode[1 0]"
        b"/Filter/FlateDecode/DecodeParms<</Predictor 15/Columns %d/Colors 1/BitsPerComponent 1>>" % (side, side, side),
        deflated_rows,
    )
    return pdf_bytes(
        [
            b"<</Type/Catalog/Pages 2 0 R>>",
            b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
            b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 72 72]/Resources<</XObject<</Im0 5 0 R>>>>/Contents 4 0 R>>",
            _stream(b"", b"q 72 0 0 72 0 0 cm /Im0 Do Q"),
            image,
        ]
    )


def _truncated_png() -> bytes:
    image = Image.effect_noise((256, 256), 64).convert("RGB")
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]
