"""`fila crops` draws the crop boundaries where anyres actually cuts the page."""

from __future__ import annotations

import numpy as np
import pymupdf
from PIL import Image
from typer.testing import CliRunner

from fila_cli.cli.app import app
from fila_cli.cli.crops_view import CROP_LINE_COLOR, GLOBAL_VIEW_COLOR

A4_POINTS = (595, 842)


def white_pdf(path, size=A4_POINTS):
    document = pymupdf.open()
    document.new_page(width=size[0], height=size[1])
    document.save(path)
    return path


def is_color(pixel, color):
    return all(abs(int(a) - b) <= 10 for a, b in zip(pixel, color))


def test_crops_png_matches_page_and_boundaries(tmp_path):
    out = tmp_path / "crops.png"
    result = CliRunner().invoke(app, ["crops", str(white_pdf(tmp_path / "a4.pdf")), "-o", str(out)])
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(out).convert("RGB"))
    height, width = picture.shape[:2]
    # An A4 page fills the 672x672 canvas by height: 672 px tall, width by the aspect ratio.
    assert height == 672 and width == round(672 * A4_POINTS[0] / A4_POINTS[1])
    # Crop boundaries: canvas x = 336 and y = 336; the page sits centred, so x on the page is
    # 336 - (672 - width) // 2.
    boundary_x = 336 - (672 - width) // 2
    boundary_y = 336
    middle_row = picture[height // 4 + 10]
    red_columns = [x for x in range(width) if is_color(middle_row[x], CROP_LINE_COLOR)]
    assert red_columns and min(red_columns) <= boundary_x <= max(red_columns) and max(red_columns) - min(red_columns) < 6
    middle_column = picture[:, width // 4 + 10]
    red_rows = [y for y in range(60, height) if is_color(middle_column[y], CROP_LINE_COLOR)]  # below the caption
    assert red_rows and min(red_rows) <= boundary_y <= max(red_rows) and max(red_rows) - min(red_rows) < 6
    # Elsewhere the page is untouched (white), and the global view's frame runs along the edge.
    assert is_color(picture[height // 4 + 10, width // 4], (255, 255, 255))
    assert is_color(picture[height // 2 + 40, 0], GLOBAL_VIEW_COLOR)


def test_crops_of_a_very_tall_image(tmp_path):
    image = tmp_path / "receipt.png"
    Image.new("RGB", (300, 1800), "white").save(image)
    out = tmp_path / "crops.png"
    result = CliRunner().invoke(app, ["crops", str(image), "-o", str(out)])
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[:2] == (1800, 300)
    # Canvas 336x1008 (3 crops stacked); the page fills it by height: boundaries at 1/3 and 2/3.
    column = picture[:, 150]
    red_rows = [y for y in range(40, 1800) if is_color(column[y], CROP_LINE_COLOR)]
    assert any(abs(y - 600) <= 3 for y in red_rows) and any(abs(y - 1200) <= 3 for y in red_rows)


def test_crops_rejects_non_png_output(tmp_path):
    result = CliRunner().invoke(app, ["crops", str(white_pdf(tmp_path / "a.pdf")), "-o", str(tmp_path / "c.jpg")])
    assert result.exit_code == 2


def test_crops_with_fusion_states_both_resolutions(tmp_path):
    """With fusion weights the page is rendered at the ConvNeXt's resolution, the crops drawn where
    anyres cuts that render, and both canvases named."""

    from fila_cli.vision.loaders.fusion_weights import save_fusion_weights
    from fila_cli.vision.model.encoder import HybridEncoder
    from tests.helpers.tiny_vision import TINY_LLM_WIDTH, tiny_clip_config, tiny_fusion_config

    fusion = tmp_path / "fusion.safetensors"
    encoder = HybridEncoder(tiny_clip_config(), 2, TINY_LLM_WIDTH, fusion=tiny_fusion_config())
    save_fusion_weights(fusion, tiny_fusion_config(), {k: v for k, v in encoder.state_dict().items() if k.startswith("cvfm.")})
    out = tmp_path / "crops.png"
    result = CliRunner().invoke(app, ["crops", str(white_pdf(tmp_path / "a4.pdf")), "--fusion", str(fusion), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "ViT canvas 672×672 · ConvNeXt 1536×1536" in result.output
    picture = np.asarray(Image.open(out).convert("RGB"))
    height, width = picture.shape[:2]
    # The A4 page fills the 1536x1536 ConvNeXt canvas by height (672 x 32/14).
    assert height == 1536 and abs(width - 1536 * A4_POINTS[0] / A4_POINTS[1]) <= 1
    # The vertical crop boundary: canvas x = 336 on the 672 canvas, mapped back to the render.
    resized_width = -(-672 * width // height)  # HF's ceil
    boundary_x = (336 - (672 - resized_width) // 2) * width / resized_width
    red_columns = [x for x in range(width) if is_color(picture[height // 4 + 10, x], CROP_LINE_COLOR)]
    assert red_columns and min(red_columns) <= boundary_x <= max(red_columns) and max(red_columns) - min(red_columns) < 8


def test_the_caption_is_readable_and_no_crop_line_crosses_it(tmp_path):
    # Issue 24: the caption read "2x2 cropsof336px" (Pillow's bitmap font) and a red line crossed it.
    out = tmp_path / "crops.png"
    result = CliRunner().invoke(app, ["crops", str(white_pdf(tmp_path / "a4.pdf")), "-o", str(out)])
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(out).convert("RGB"))
    width = picture.shape[1]
    boundary_x = 336 - (672 - width) // 2
    # Under the caption's first line the crop line is hidden by the caption's white box.
    column = picture[6:20, boundary_x]
    assert sum(is_color(pixel, CROP_LINE_COLOR) for pixel in column) < len(column) // 2
