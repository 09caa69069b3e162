"""A page as the model sees it: its size in points, the render fila makes of it, and that render's canvas.

Three coordinate systems meet here:

- PDF points of the page *as displayed*: rotation applied, origin at the top-left of the visible
  (crop) box. PyMuPDF's ``page.rect`` is this box; its text coordinates are unrotated and are
  mapped here with ``page.rotation_matrix`` (``page_words``).
- pixels of the render: points x ``zoom`` (the picture ``fila crops`` draws without fusion);
- pixels of the anyres canvas: the render resized into the canvas and padded (``CanvasGeometry``).

``page_geometry`` reproduces the render size that ``render_for_canvas`` gives (MuPDF's own
rounding), so a box located here falls where the crops really cut the page, without rendering it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pymupdf

from fila_cli.config import AnyresConfig
from fila_cli.documents.canvas import CanvasGeometry, plan_canvas
from fila_cli.documents.document import DEFAULT_MAX_PIXELS, Document
from fila_cli.documents.render import canvas_fill_scale

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1)


@dataclass(frozen=True)
class PageGeometry:
    """A page as the model sees it: the render fila makes of it, and that render's canvas."""

    page_size: tuple[float, float]  # (width, height) in points as displayed (pixels for an image)
    zoom: float  # pixels per point of the render
    canvas: CanvasGeometry  # original_size is the render's (height, width) in pixels

    def to_canvas(self, x: float, y: float) -> tuple[float, float]:
        """A point of the page (points) on the canvas (pixels)."""
        (orig_h, orig_w), (res_h, res_w) = self.canvas.original_size, self.canvas.resized_size
        return (self.canvas.pad_left + x * self.zoom * res_w / orig_w,
                self.canvas.pad_top + y * self.zoom * res_h / orig_h)

    def from_canvas(self, cx: float, cy: float) -> tuple[float, float]:
        x, y = self.canvas.canvas_to_original(cx, cy)
        return x / self.zoom, y / self.zoom

    def box_to_canvas(self, box: Box) -> Box:
        x0, y0 = self.to_canvas(box[0], box[1])
        x1, y1 = self.to_canvas(box[2], box[3])
        return x0, y0, x1, y1

    def box_to_render(self, box: Box) -> Box:
        """A box of the page (points) in the render's pixels."""
        return box[0] * self.zoom, box[1] * self.zoom, box[2] * self.zoom, box[3] * self.zoom

    def points_per_canvas_pixel(self) -> float:
        """The larger of the two axes' scales, so a clearance in pixels is at least that on both."""
        (orig_h, orig_w), (res_h, res_w) = self.canvas.original_size, self.canvas.resized_size
        return max(orig_w / (res_w * self.zoom), orig_h / (res_h * self.zoom))

    def crops_touched(self, box: Box) -> list[int]:
        """Row-major indices of the crops a box of the page (points) overlaps."""
        return crops_touched(self.box_to_canvas(box), self.canvas)


def page_geometry(page_size: tuple[float, float], config: AnyresConfig, zoom: float | None = None) -> PageGeometry:
    """The render fila makes of a PDF page this size, and the canvas anyres picks for that render.

    ``zoom``: the render's pixels per point when already known (default: the zoom that fills the canvas).
    """
    zoom = canvas_fill_scale(page_size, config) if zoom is None else zoom
    render = (pymupdf.Rect(0, 0, *page_size) * pymupdf.Matrix(zoom, zoom)).irect  # MuPDF's own rounding
    return PageGeometry(page_size, zoom, plan_canvas((render.height, render.width), config))


def document_page_geometry(document: Document, index: int, config: AnyresConfig,
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> PageGeometry:
    """Page ``index`` (0-based) of an open document as ``render_for_canvas`` renders it for the ViT canvas."""
    page_size = document.page_size_points(index)
    if document.kind == "image":
        zoom = document.render_scale(index, 1.0, max_pixels)
        width, height = document.render_size(index, zoom)
        return PageGeometry(page_size, zoom, plan_canvas((height, width), config))
    return page_geometry(page_size, config, document.render_scale(index, canvas_fill_scale(page_size, config), max_pixels))


def crops_touched(box_on_canvas: Box, canvas: CanvasGeometry) -> list[int]:
    """Row-major indices of the crops a canvas box overlaps (open intervals: touching is not overlapping)."""
    x0, y0, x1, y1 = box_on_canvas
    return [i for i, (left, top, right, bottom) in enumerate(canvas.crop_boxes_on_canvas())
            if x0 < right and left < x1 and y0 < bottom and top < y1]
