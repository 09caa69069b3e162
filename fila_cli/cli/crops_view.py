"""A picture of how a page is cut: crop boundaries and the global view drawn on the page, and
where an answer lies on it (evidence boxes, red where a crop boundary cuts them).

Text that a crop boundary cuts in half is what FILA's whole-page ConvNeXt branch exists for;
this lets a user see where those cuts fall on their own page.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

from PIL import Image, ImageDraw

from fila_cli.config import AnyresConfig
from fila_cli.documents.canvas import CanvasGeometry
from fila_cli.documents.evidence import Evidence, EvidenceBox
from fila_cli.errors import UsageError

CROP_LINE_COLOR = (220, 30, 30)  # red: crop boundaries
GLOBAL_VIEW_COLOR = (30, 90, 220)  # blue: the global view sees the whole page
LABEL_BACKGROUND = (255, 255, 255)
# Lines are about 1/300 of the page's shorter side, never thinner than 2 px.
LINE_WIDTH_DIVISOR = 300
MIN_LINE_WIDTH = 2


def line_width_for(image: Image.Image) -> int:
    return max(MIN_LINE_WIDTH, round(min(image.size) / LINE_WIDTH_DIVISOR))


def crop_boundaries_on_page(geometry: CanvasGeometry) -> tuple[list[float], list[float]]:
    """x positions of the vertical and y positions of the horizontal crop boundaries that fall
    inside the page, in the page's own pixel coordinates."""
    rows, cols = geometry.grid
    s = geometry.crop_size
    width, height = geometry.original_size[1], geometry.original_size[0]
    xs = [geometry.canvas_to_original(c * s, 0)[0] for c in range(1, cols)]
    ys = [geometry.canvas_to_original(0, r * s)[1] for r in range(1, rows)]
    return [x for x in xs if 0 < x < width], [y for y in ys if 0 < y < height]


# Pillow's built-in font has no multiplication sign: the picture's label writes sizes with an x.
LABEL_TIMES = "x"


def describe_resolutions(geometry: CanvasGeometry, highres: CanvasGeometry | None = None, times: str = "×") -> str:
    """"canvas 672×672", or with fusion "ViT canvas 672×672 · ConvNeXt 1536×1536" (width × height)."""
    canvas = f"{geometry.canvas_size[1]}{times}{geometry.canvas_size[0]}"
    if highres is None:
        return f"canvas {canvas}"
    return f"ViT canvas {canvas} · ConvNeXt {highres.canvas_size[1]}{times}{highres.canvas_size[0]}"


def draw_crops(page: Image.Image, geometry: CanvasGeometry, highres: CanvasGeometry | None = None) -> Image.Image:
    """The page (same size) with the crop grid in red, the global view's frame in blue and a label;
    ``highres`` (fusion on): the ConvNeXt's canvas, stated in the label."""
    if page.size != (geometry.original_size[1], geometry.original_size[0]):
        raise ValueError("the geometry was planned for an image of another size")
    picture = page.convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    line = line_width_for(picture)
    draw.rectangle([0, 0, width - 1, height - 1], outline=GLOBAL_VIEW_COLOR, width=line)
    xs, ys = crop_boundaries_on_page(geometry)
    for x in xs:
        draw.line([(round(x), 0), (round(x), height - 1)], fill=CROP_LINE_COLOR, width=line)
    for y in ys:
        draw.line([(0, round(y)), (width - 1, round(y))], fill=CROP_LINE_COLOR, width=line)
    rows, cols = geometry.grid
    size = f"{geometry.crop_size}{LABEL_TIMES}{geometry.crop_size}"
    label = (f"{describe_resolutions(geometry, highres, LABEL_TIMES)}, {rows}{LABEL_TIMES}{cols} crops of {geometry.crop_size} px (red)\n"
             f"global view: the whole page at {size} (blue)")
    _draw_label(draw, label, (line * 2, line * 2), picture.width)
    return picture


# The caption's text is about 1/40 of the picture's width (never under 10 px), so that its two lines
# fit across a page; a margin of a third of that keeps it off the lines around it.
LABEL_WIDTH_DIVISOR = 40
MIN_LABEL_SIZE = 10


def _draw_label(draw: ImageDraw.ImageDraw, label: str, at: tuple[int, int], width: int) -> None:
    """The caption on a white box that hides the crop lines under it, in a scalable font (Pillow's
    bitmap font squeezes spaces: "cropsof336px")."""
    from PIL import ImageFont

    font_size = max(MIN_LABEL_SIZE, width // LABEL_WIDTH_DIVISOR)
    try:
        font = ImageFont.load_default(size=font_size)
    except (TypeError, ImportError):  # Pillow without FreeType: the bitmap font
        font = ImageFont.load_default()
    margin = max(2, font_size // 3)
    x0, y0, x1, y1 = draw.multiline_textbbox(at, label, font=font)
    draw.rectangle([x0 - margin, y0 - margin, x1 + margin, y1 + margin], fill=LABEL_BACKGROUND)
    draw.multiline_text(at, label, fill=CROP_LINE_COLOR, font=font)


# Evidence boxes: red where a crop boundary cuts the text, green where it lies inside one crop.
EVIDENCE_STRADDLING_COLOR = (255, 0, 0)
EVIDENCE_INSIDE_COLOR = (0, 170, 0)


def draw_evidence(page: Image.Image, geometry: CanvasGeometry, boxes: list[EvidenceBox], page_size: tuple[float, float],
                  highres: CanvasGeometry | None = None) -> Image.Image:
    """The crop picture (``draw_crops``) with each evidence box of this page outlined, red where it
    straddles a crop boundary. ``page_size``: the page's (width, height) in points, which the
    boxes' ``bbox_pt`` are in (the picture may be any render of the page)."""
    picture = draw_crops(page, geometry, highres)
    draw = ImageDraw.Draw(picture)
    line = line_width_for(picture)
    scale_x, scale_y = picture.width / page_size[0], picture.height / page_size[1]
    for box in boxes:
        color = EVIDENCE_STRADDLING_COLOR if box.straddles_crop_boundary else EVIDENCE_INSIDE_COLOR
        for x0, y0, x1, y1 in box.line_boxes_pt:
            # Just outside the text, so that the outline hides none of it.
            draw.rectangle([x0 * scale_x - line, y0 * scale_y - line, x1 * scale_x + line, y1 * scale_y + line],
                           outline=color, width=line)
    return picture


def write_evidence_picture(file: Path, output: Path, page: int, evidence: Evidence, config: AnyresConfig,
                           highres_scale: Fraction | None = None, password: str | None = None) -> CanvasGeometry:
    """Write page ``page`` (1-based) of ``file`` as the model receives it, with its crop boundaries
    and ``evidence``'s boxes on it (``draw_evidence``), as ``fila crops --find`` draws them; the canvas."""
    from fila_cli.documents.canvas import plan_canvas, scale_geometry
    from fila_cli.documents.document import open_document
    from fila_cli.documents.render import render_for_canvas

    with open_document(file, password=password) as document:
        image = render_for_canvas(document, page - 1, config, highres_scale)
        page_size = document.page_size_points(page - 1)
    geometry = plan_canvas((image.height, image.width), config)
    highres = scale_geometry(geometry, highres_scale) if highres_scale is not None else None
    try:
        draw_evidence(image, geometry, evidence.on_page(page), page_size, highres).save(output)
    except OSError as error:
        raise UsageError(f"{output}: cannot write the picture ({error.strerror or error}); check the folder") from None
    return geometry


def describe_evidence_box(box: EvidenceBox, grid: tuple[int, int]) -> str:
    """'page 2: "2,510.40 GBP" (exact) at 151.2,167.9-237.6,182.9 pt, in crop 1 (row 1, column 1)'."""
    _, cols = grid
    x0, y0, x1, y1 = box.bbox_pt
    crops = ", ".join(f"{c + 1} (row {c // cols + 1}, column {c % cols + 1})" for c in box.crops)
    where = (f"across a crop boundary: crops {crops}" if box.straddles_crop_boundary
             else f"inside crop {crops}" if box.crops else "outside every crop")
    return f'page {box.page}: "{box.text}" ({box.match}{", OCR" if box.source == "ocr" else ""}) at {x0:.1f},{y0:.1f}-{x1:.1f},{y1:.1f} pt, {where}'


def print_found(file: Path, text: str, page: int, geometry: CanvasGeometry, evidence: Evidence, as_json: bool) -> None:
    """What ``fila crops --find`` prints on stdout: one line per place, or one JSON object."""
    if as_json:
        record = {"file": str(file), "find": text, "page": page, "canvas": list(geometry.canvas_size),
                  "grid": list(geometry.grid), **evidence.to_json()}
        print(json.dumps(record), flush=True)
        return
    if not evidence.boxes:
        print(f"{file}: {text!r}: {evidence.reason}", flush=True)
        return
    for box in evidence.boxes:
        print(describe_evidence_box(box, geometry.grid), flush=True)
