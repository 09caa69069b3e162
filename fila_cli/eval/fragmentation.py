"""The fragmentation benchmark: answers inside one anyres crop, or cut in two by a crop boundary.

FILA's claim (its Figure 1) is that text which LLaVA-NeXT's crops cut in half is read better once
the whole-page ConvNeXt branch is fused in. This module writes PDF pages (invoice-, table- and
form-like, with varied page shapes, fonts and sizes) where each question's answer (a code, an
amount or a name) is placed, in PDF points, either wholly inside one crop or straddling a crop
boundary of the canvas fila itself will pick for that page: the same canvas choice
(``plan_canvas``) at the same render zoom (``canvas_fill_scale``, the integer pixel size MuPDF
gives) that ``fila ask`` and ``fila eval`` use. Every row records which, and the answer's box as
the evidence locator (``documents.evidence``, ``fila crops --find``) finds it on the written page.

    rows = make_fragmentation(Path("frag"), n=200, seed=0)
    # frag/fragmentation.jsonl, frag/pages/0001.pdf ..., frag/generator.json
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pymupdf

from fila_cli.config import AnyresConfig

# The page's geometry is the one evidence uses (`fila crops --find`, the answer records): "inside" and
# "straddling" here mean what they mean there.
from fila_cli.documents.document import open_document
from fila_cli.documents.evidence import locate_answer
from fila_cli.documents.page_geometry import PageGeometry, page_geometry
from fila_cli.errors import UsageError

DATA_FILE = "fragmentation.jsonl"
PAGES_DIR = "pages"
GENERATOR_FILE = "generator.json"

KINDS = ("invoice", "table", "form")
PLACEMENTS = ("inside", "straddling")
# (width, height) in points: A4 and Letter both ways up, a till receipt and a wide banner, so the
# pages land on different canvases (2x2, 3x1, 1x3 crops with the paper's pinpoints).
PAGE_SIZES: dict[str, tuple[float, float]] = {
    "a4": (595.0, 842.0), "letter": (612.0, 792.0), "a4-landscape": (842.0, 595.0),
    "receipt": (227.0, 842.0), "banner": (842.0, 283.0),
}
# PDF base-14 fonts (no font files needed): Helvetica, Times, Courier, regular and bold.
FONTS = ("helv", "hebo", "tiro", "tibo", "cour", "cobo")
FONT_SIZES = (8.0, 9.0, 10.0, 11.0, 12.0, 14.0, 16.0)
# Blank border of every page, in points (printers' usual half inch).
PAGE_MARGIN = 36.0
# Clearance, in canvas pixels, between an "inside" answer and every crop edge, so that rounding in
# rendering (at most a pixel) cannot make it touch a neighbouring crop.
CLEARANCE_PX = 4.0
# Where a boundary cuts a straddling answer: as a fraction of its width (a vertical boundary) or
# of its text box's height (a horizontal one). The height range keeps the cut inside the glyphs'
# ink (the box reaches from the font's descender to its ascender, above capital height).
CUT_ACROSS_WIDTH = (0.3, 0.7)
CUT_ACROSS_HEIGHT = (0.4, 0.6)
LINE_SPACING = 1.7  # line pitch of the filler text, in font sizes
# Share of pages whose filler is in the answer's own font and size (the others mix styles).
SAME_STYLE_SHARE = 0.7
# Invoices and forms get a second column of fields on pages at least this wide (points).
MIN_TWO_COLUMN_WIDTH = 400.0
ONE_COLUMN = (0.0,)
TWO_COLUMNS = (0.0, 0.5)  # where columns start, as fractions of the writable width
QUANTITY_COLUMN = 0.55  # a table's quantity column, as a fraction of the writable width
TITLES = {"invoice": "INVOICE", "table": "STATEMENT OF ACCOUNT", "form": "APPLICATION FORM"}
LABEL_GAP = 6.0  # points between a label and its value
PLACEMENT_TRIES = 200

FIRST_NAMES = ("Ada", "Grace", "Alan", "Margaret", "Chidi", "Yuki", "Priya", "Lars", "Sofia", "Omar", "Ines", "Tomasz")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Okafor", "Tanaka", "Sharma", "Nilsson", "Rossi", "Haddad", "Moreau", "Nowak")
# (label, kind of value, question): what a question can ask for.
FIELDS = (
    ("invoice number", "code", "What is the invoice number?"), ("order code", "code", "What is the order code?"),
    ("account number", "code", "What is the account number?"), ("reference", "code", "What is the reference?"),
    ("customer id", "code", "What is the customer ID?"), ("total due", "amount", "What is the total due?"),
    ("subtotal", "amount", "What is the subtotal?"), ("tax", "amount", "How much is the tax?"),
    ("amount paid", "amount", "What is the amount paid?"), ("balance", "amount", "What is the balance?"),
    ("customer name", "name", "What is the customer's name?"), ("signed by", "name", "Who signed?"),
    ("contact person", "name", "Who is the contact person?"), ("approved by", "name", "Who approved it?"),
)

# Filler only (never asked about): more fields, so a page's labels need not repeat.
FILLER_FIELDS = (
    ("date", "date", ""), ("due date", "date", ""), ("phone", "phone", ""), ("vat id", "code", ""),
    ("project", "code", ""), ("department", "name", ""), ("terms", "terms", ""), ("issued by", "name", ""),
)
LINE_ITEMS = ("Paper A4", "Toner cartridge", "Cables", "Service hours", "Freight", "Licence", "Support plan", "Binders",
              "Printer stand", "Ink set", "Labels", "Maintenance")


@functools.cache
def _font(name: str) -> pymupdf.Font:
    return pymupdf.Font(name)


@dataclass(frozen=True)
class TextStyle:
    font: str
    size: float

    def width(self, text: str) -> float:
        return pymupdf.get_text_length(text, fontname=self.font, fontsize=self.size)

    def box(self, text: str, x: float, baseline: float) -> tuple[float, float, float, float]:
        """The text's box as MuPDF reports it: from the font's ascender to its descender."""
        font = _font(self.font)
        return x, baseline - font.ascender * self.size, x + self.width(text), baseline - font.descender * self.size

    def ascent(self) -> float:
        return _font(self.font).ascender * self.size

    def height(self) -> float:
        font = _font(self.font)
        return (font.ascender - font.descender) * self.size


@dataclass
class FragmentationRow:
    question_id: str
    question: str
    answers: list[str]
    image: str  # the page's PDF, relative to the data file
    placement: str  # "inside" or "straddling"
    cut: str | None  # straddling: "vertical" (a boundary between crop columns) or "horizontal"
    kind: str  # invoice, table or form
    page_size: list[float]  # (width, height) in points
    answer_box: list[float]  # (x0, y0, x1, y1) in points, as MuPDF reports the text
    answer_box_on_canvas: list[float]
    canvas: list[int]  # (height, width)
    grid: list[int]  # (rows, cols)
    font: str
    font_size: float


def make_fragmentation(out_dir: Path, n: int, seed: int = 0, config: AnyresConfig | None = None,
                       on_page: Callable[[int, int], None] | None = None) -> list[FragmentationRow]:
    """Write ``n`` pages (one question each, placements alternating) and the rows describing them."""
    if n < 1:
        raise UsageError(f"--n must be at least 1 (got {n})")
    config = config or AnyresConfig()
    out_dir = Path(out_dir)
    if (out_dir / DATA_FILE).exists():
        raise UsageError(f"{out_dir / DATA_FILE} already exists; choose an empty folder")
    (out_dir / PAGES_DIR).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        placement = PLACEMENTS[index % len(PLACEMENTS)]
        rows.append(_make_page(out_dir, index, placement, rng, config))
        if on_page is not None:
            on_page(index + 1, n)
    with open(out_dir / DATA_FILE, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(asdict(row)) + "\n")
    (out_dir / GENERATOR_FILE).write_text(json.dumps({"n": n, "seed": seed, "anyres": asdict(config)}, indent=2) + "\n")
    return rows


def _make_page(out_dir: Path, index: int, placement: str, rng: random.Random, config: AnyresConfig) -> FragmentationRow:
    kind = rng.choice(KINDS)
    size_name = rng.choice(list(PAGE_SIZES))
    geometry = page_geometry(PAGE_SIZES[size_name], config)
    label, value_kind, question = rng.choice(FIELDS)
    answer = _value(value_kind, rng)
    for _ in range(PLACEMENT_TRIES):
        style = TextStyle(rng.choice(FONTS), rng.choice(FONT_SIZES))
        spot = _place(answer, style, placement, geometry, rng)
        if spot is not None:
            break
    else:  # pragma: no cover - the page shapes above always leave room
        raise RuntimeError(f"could not place a {placement} answer on a {size_name} page")
    x, baseline, cut = spot
    path = Path(PAGES_DIR) / f"{index + 1:04d}.pdf"
    _write_page(out_dir / path, kind, geometry, style, label, answer, x, baseline, rng)
    box = _located(out_dir / path, answer, placement, config)
    return FragmentationRow(
        question_id=f"frag-{index + 1:04d}", question=question, answers=[answer], image=str(path),
        placement=placement, cut=cut, kind=kind, page_size=list(geometry.page_size), answer_box=[round(v, 3) for v in box],
        answer_box_on_canvas=[round(v, 2) for v in geometry.box_to_canvas(box)], canvas=list(geometry.canvas.canvas_size),
        grid=list(geometry.canvas.grid), font=style.font, font_size=style.size)


def _located(path: Path, answer: str, placement: str, config: AnyresConfig) -> Box:
    """The answer's box as `fila crops --find` (and an answer's evidence) locates it on the written
    page; its placement must be the one intended."""
    with open_document(path) as document:
        evidence = locate_answer(document, [0], answer, config, ocr=False)
    if len(evidence.boxes) != 1 or evidence.boxes[0].straddles_crop_boundary != (placement == "straddling"):
        raise RuntimeError(f"{path}: the answer is not located {placement} once ({evidence.to_json()})")  # a bug here
    return evidence.boxes[0].bbox_pt


def _value(kind: str, rng: random.Random) -> str:
    if kind == "code":
        letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(rng.randint(2, 3)))
        return f"{letters}-{rng.randint(10000, 999999)}-{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(0, 9)}"
    if kind == "amount":
        return f"{rng.randint(1, 98_000):,}.{rng.randint(0, 99):02d}"
    if kind == "date":
        return f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(2015, 2026)}"
    if kind == "phone":
        return f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    if kind == "terms":
        return rng.choice(("Net 30", "Net 60", "Due on receipt", "2/10 net 30"))
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


# -- placing the answer ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Crop:
    """One crop of the canvas, in the page's points."""

    row: int
    col: int
    bounds: tuple[float, float, float, float]  # the whole crop (it may reach into the padding)
    writable: tuple[float, float, float, float]  # the part inside the page's margins


def _crops_in_points(geometry: PageGeometry) -> list[_Crop]:
    page_w, page_h = geometry.page_size
    _, cols = geometry.canvas.grid
    crops = []
    for i, (left, top, right, bottom) in enumerate(geometry.canvas.crop_boxes_on_canvas()):
        x0, y0 = geometry.from_canvas(left, top)
        x1, y1 = geometry.from_canvas(right, bottom)
        writable = (max(x0, PAGE_MARGIN), max(y0, PAGE_MARGIN), min(x1, page_w - PAGE_MARGIN), min(y1, page_h - PAGE_MARGIN))
        crops.append(_Crop(i // cols, i % cols, (x0, y0, x1, y1), writable))
    return crops


def _place(answer: str, style: TextStyle, placement: str, geometry: PageGeometry,
           rng: random.Random) -> tuple[float, float, str | None] | None:
    """(x, baseline, cut) of the answer in points, or None when this style cannot be placed so."""
    width, height, ascent = style.width(answer), style.height(), style.ascent()
    clearance = CLEARANCE_PX * geometry.points_per_canvas_pixel()
    page_w, page_h = geometry.page_size
    crops = _crops_in_points(geometry)
    rows, cols = geometry.canvas.grid
    if placement == "inside":
        fitting = [c for c in crops if c.writable[2] - c.writable[0] >= width + 2 * clearance
                   and c.writable[3] - c.writable[1] >= height + 2 * clearance]
        if not fitting:
            return None
        left, top, right, bottom = rng.choice(fitting).writable
        x = rng.uniform(left + clearance, right - clearance - width)
        box_top = rng.uniform(top + clearance, bottom - clearance - height)
        return x, box_top + ascent, None
    cut = rng.choice(["vertical"] * (cols > 1) + ["horizontal"] * (rows > 1))
    if cut == "vertical":
        # The left edge of a crop column cuts the answer; its row of crops is one where no
        # horizontal edge comes near it.
        column = rng.randrange(1, cols)
        boundary = next(c.bounds[0] for c in crops if c.col == column)
        x = boundary - rng.uniform(*CUT_ACROSS_WIDTH) * width
        row = rng.randrange(rows)
        _, top, _, bottom = next(c.writable for c in crops if c.row == row)
        top, bottom = top + clearance, bottom - clearance - height
        if x < PAGE_MARGIN or x + width > page_w - PAGE_MARGIN or bottom < top:
            return None
        return x, rng.uniform(top, bottom) + ascent, cut
    # The top edge of a crop row cuts the answer; its column of crops is one where no vertical
    # edge comes near it.
    row = rng.randrange(1, rows)
    boundary = next(c.bounds[1] for c in crops if c.row == row)
    box_top = boundary - rng.uniform(*CUT_ACROSS_HEIGHT) * height
    column = rng.randrange(cols)
    left, _, right, _ = next(c.writable for c in crops if c.col == column)
    left, right = left + clearance, right - clearance - width
    if box_top < PAGE_MARGIN or box_top + height > page_h - PAGE_MARGIN or right < left:
        return None
    return rng.uniform(left, right), box_top + ascent, cut


# -- writing the page ------------------------------------------------------------------------

Box = tuple[float, float, float, float]


def _overlaps(a: Box, b: Box, pad: float = 2.0) -> bool:
    return a[0] - pad < b[2] and b[0] - pad < a[2] and a[1] - pad < b[3] and b[1] - pad < a[3]


def _write_page(path: Path, kind: str, geometry: PageGeometry, style: TextStyle, label: str, answer: str,
                x: float, baseline: float, rng: random.Random) -> Box:
    """Write the page: the answer and its label where placed, filler of the page's kind around them."""
    page_w, page_h = geometry.page_size
    document = pymupdf.open()
    page = document.new_page(width=page_w, height=page_h)
    text = page.new_shape()  # all the page's text in one content stream (a shape per string is slow)
    answer_box = style.box(answer, x, baseline)
    text.insert_text((x, baseline), answer, fontname=style.font, fontsize=style.size)
    taken = [answer_box]
    taken.append(_write_label(text, style, label, answer_box, baseline, kind))
    if kind == "form":  # the answer written in a form's box
        x0, y0, x1, y1 = answer_box
        page.draw_rect(pymupdf.Rect(x0 - 2, y0 - 1, x1 + 2, y1 + 1), color=(0.3, 0.3, 0.3), width=0.5)
    _write_filler(page, text, kind, geometry, style, label, answer, taken, rng)
    text.commit()
    document.save(path, garbage=3, deflate=True)
    document.close()
    return answer_box


def _write_label(text_shape: pymupdf.Shape, style: TextStyle, label: str, answer_box: Box, baseline: float, kind: str) -> Box:
    text = label.capitalize() + ":"
    label_style = TextStyle(_bold(style.font), style.size)
    width = label_style.width(text)
    if kind != "form" and answer_box[0] - LABEL_GAP - width >= PAGE_MARGIN / 2:
        x, label_baseline = answer_box[0] - LABEL_GAP - width, baseline  # on the same line, to the left
    else:
        x, label_baseline = answer_box[0], answer_box[1] - LABEL_GAP / 2 - (style.height() - style.ascent())  # above
    text_shape.insert_text((x, label_baseline), text, fontname=label_style.font, fontsize=label_style.size)
    return label_style.box(text, x, label_baseline)


def _bold(font: str) -> str:
    return {"helv": "hebo", "tiro": "tibo", "cour": "cobo"}.get(font, font)


def _write_filler(page: pymupdf.Page, text_shape: pymupdf.Shape, kind: str, geometry: PageGeometry, style: TextStyle, label: str, answer: str,
                  taken: list[Box], rng: random.Random) -> None:
    """Rows of the page's kind down the page, each piece skipped where it would touch the answer or its label.

    Invoices and forms are "Label: value" pairs in one or two columns, each label used once;
    tables are item rows (description, quantity, amount) under a header, with row rules. No filler
    contains the answer (so it is on the page exactly once) and none repeats the question's label
    (so the question has one answer).
    """
    page_w, page_h = geometry.page_size
    same_style = rng.random() < SAME_STYLE_SHARE
    filler = style if same_style else TextStyle(rng.choice(FONTS), rng.choice(FONT_SIZES))
    labels = [f for f in FIELDS + FILLER_FIELDS if f[0] != label]
    rng.shuffle(labels)
    columns = TWO_COLUMNS if page_w >= MIN_TWO_COLUMN_WIDTH and kind != "table" else ONE_COLUMN
    rows: list[list[tuple[float, str, TextStyle]]] = [[(PAGE_MARGIN, TITLES[kind], TextStyle(_bold(filler.font), filler.size))]]
    if kind == "table":
        rows.append(_table_row(("Description", "Qty", "Amount"), page_w, TextStyle(_bold(filler.font), filler.size)))
    baseline = PAGE_MARGIN + filler.ascent()
    while baseline < page_h - PAGE_MARGIN:
        if not rows:
            rows.append(_filler_row(kind, labels, columns, page_w, filler, rng))
        placed = [box for x, text, piece_style in rows.pop(0)
                  if (box := _try_write(text_shape, text, x, baseline, piece_style, answer, taken, page_w, page_h)) is not None]
        rule = (PAGE_MARGIN, baseline + filler.height() - filler.ascent() + 1, page_w - PAGE_MARGIN,
                baseline + filler.height() - filler.ascent() + 1)
        if kind == "table" and placed and not any(_overlaps(rule, t) for t in taken):  # a table's row rule
            page.draw_line(rule[:2], rule[2:], color=(0.6, 0.6, 0.6), width=0.4)
        baseline += LINE_SPACING * filler.size


def _try_write(text_shape: pymupdf.Shape, text: str, x: float, baseline: float, style: TextStyle, answer: str,
               taken: list[Box], page_w: float, page_h: float) -> Box | None:
    box = style.box(text, x, baseline)
    inside_page = box[2] <= page_w - PAGE_MARGIN / 2 and box[3] <= page_h - PAGE_MARGIN / 2
    if not text or answer in text or not inside_page or any(_overlaps(box, t) for t in taken):
        return None
    text_shape.insert_text((x, baseline), text, fontname=style.font, fontsize=style.size)
    taken.append(box)
    return box


def _filler_row(kind: str, labels: list[tuple[str, str, str]], columns: tuple[float, ...], page_w: float,
                style: TextStyle, rng: random.Random) -> list[tuple[float, str, TextStyle]]:
    if kind == "table" or not labels:
        item = rng.choice(LINE_ITEMS)
        return _table_row((item, str(rng.randint(1, 40)), _value("amount", rng)), page_w, style)
    pieces = []
    for column in columns:
        if not labels:
            break
        label, value_kind, _ = labels.pop()
        x = PAGE_MARGIN + column * (page_w - 2 * PAGE_MARGIN)
        text = label.capitalize() + ":"
        label_style = TextStyle(_bold(style.font), style.size) if kind == "form" else style
        pieces.append((x, text, label_style))
        pieces.append((x + label_style.width(text) + LABEL_GAP, _value(value_kind, rng), style))
    return pieces


def _table_row(cells: tuple[str, str, str], page_w: float, style: TextStyle) -> list[tuple[float, str, TextStyle]]:
    """Description at the left margin, quantity at a fixed column, amount right-aligned."""
    description, quantity, amount = cells
    usable = page_w - 2 * PAGE_MARGIN
    return [(PAGE_MARGIN, description, style), (PAGE_MARGIN + QUANTITY_COLUMN * usable, quantity, style),
            (page_w - PAGE_MARGIN - style.width(amount), amount, style)]


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line.strip()]


def generator_config(data_file: Path) -> AnyresConfig | None:
    """The anyres settings the pages beside ``data_file`` were made for (None if it has no record)."""
    record = Path(data_file).parent / GENERATOR_FILE
    try:
        anyres = json.loads(record.read_text())["anyres"]
        return AnyresConfig(crop_size=anyres["crop_size"], image_grid_pinpoints=anyres["image_grid_pinpoints"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
