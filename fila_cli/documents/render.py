"""Rendering a document page at the resolution its anyres canvas needs.

A PDF page has no pixel size of its own. The canvas choice depends only on the page's aspect
ratio once the page is large, so we plan it with the page at a nominal print resolution and render
at the zoom that makes the page exactly fill that canvas: anyres then neither upscales (blur) nor
throws rendered pixels away (wasted time and memory).

With fusion on, the ConvNeXt reads the page on a canvas 32/14 times larger, from the same render:
the page is rendered once, at the zoom that fills that high-resolution canvas, and the ViT canvas is
resized down from it by anyres (as HF would resize any large image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from PIL import Image

from fila_cli.config import AnyresConfig
from fila_cli.documents.canvas import select_best_resolution
from fila_cli.documents.document import DEFAULT_MAX_PIXELS, Document
from fila_cli.documents.notices import ReadNotices

POINTS_PER_INCH = 72.0
# Resolution at which the canvas is planned; any page this large picks its canvas by shape alone.
PLANNING_DPI = 300.0
_ROUNDING_MARGIN = 1e-6


def canvas_fill_scale(page_size_points: tuple[float, float], config: AnyresConfig, highres_scale: Fraction | None = None) -> float:
    """Pixels per point at which the page exactly fills its chosen canvas (times ``highres_scale``:
    the ConvNeXt's high-resolution canvas, e.g. 1536x1536 for 672x672)."""
    width_pt, height_pt = page_size_points
    zoom = PLANNING_DPI / POINTS_PER_INCH
    nominal = (max(1, round(height_pt * zoom)), max(1, round(width_pt * zoom)))
    canvas_h, canvas_w = select_best_resolution(nominal, config.image_grid_pinpoints)
    if highres_scale is not None:
        canvas_h, canvas_w = canvas_h * highres_scale, canvas_w * highres_scale
    # The exact fit, nudged down so that the renderer's rounding up never overshoots the canvas.
    return float(min(canvas_h / height_pt, canvas_w / width_pt)) * (1 - _ROUNDING_MARGIN)


def render_for_canvas(document: Document, index: int, config: AnyresConfig, highres_scale: Fraction | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Page ``index`` (0-based) as an RGB image covering its canvas, or with ``highres_scale`` (fusion
    on: ``encoder.highres_scale``) the ConvNeXt's high-resolution canvas: one render serves both
    branches. Images come back as they are (capped at max_pixels): their pixels are the original ones."""
    if document.kind == "image":
        return document.render_page(index, 1.0, max_pixels)
    return document.render_page(index, canvas_fill_scale(document.page_size_points(index), config, highres_scale), max_pixels)


@dataclass
class RenderedPage:
    index: int  # 0-based
    image: Image.Image
    text: str  # the text layer, when --text-layer asked for it
    render_s: float
    notices: ReadNotices = field(default_factory=ReadNotices)  # what MuPDF said about the page (cached with its tokens)
