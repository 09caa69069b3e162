"""Each view receives exactly its own region of every ConvNeXt stage map, and the
high-resolution canvas is the ViT canvas scaled exactly (crops) or to within half a pixel (page)."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from fila_cli.config import AnyresConfig, ConvNeXtConfig
from fila_cli.documents.canvas import plan_canvas, scale_geometry
from fila_cli.vision.model.alignment import align_stage

GRID = 24
STAGE_STRIDES = ConvNeXtConfig().stage_strides
CELL_FACTORS = [8, 4, 2, 1]  # stage cells along one ViT patch, stages 1-4
SCALE = ConvNeXtConfig().input_scale()  # 32/14


def coordinate_map(height: int, width: int) -> torch.Tensor:
    """Channel 0 = the cell's row, channel 1 = its column: every cell identifies itself."""
    rows = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width)
    return torch.stack([rows, cols])


def highres_geometry(original_size):
    return scale_geometry(plan_canvas(original_size, AnyresConfig()), SCALE)


def stage_map_size(canvas_size, stride):
    """Stage map of a high-resolution canvas: its size / stride, exactly."""
    assert canvas_size[0] % stride == 0 and canvas_size[1] % stride == 0
    return canvas_size[0] // stride, canvas_size[1] // stride


@pytest.mark.parametrize("original_size", [(1123, 794), (1800, 300), (200, 1600), (200, 150)])
@pytest.mark.parametrize("stage", range(4))
def test_crop_receives_its_own_cells(original_size, stage):
    geometry = highres_geometry(original_size)
    height, width = stage_map_size(geometry.canvas_size, STAGE_STRIDES[stage])
    factor = CELL_FACTORS[stage]
    stage_map = coordinate_map(height, width)
    pooled = align_stage(stage_map, geometry, GRID)  # [n_views, 576, 2]
    windows = align_stage(stage_map, geometry, GRID, windowed=True)  # [n_views, 576, f*f, 2]
    rows, cols = geometry.grid
    crop_cells = GRID * factor
    for r in range(rows):
        for c in range(cols):
            view = 1 + r * cols + c
            for i in (0, 7, GRID - 1):
                for j in (0, 13, GRID - 1):
                    top, left = r * crop_cells + i * factor, c * crop_cells + j * factor
                    window = windows[view, i * GRID + j]
                    expected_rows = torch.arange(top, top + factor, dtype=torch.float64).repeat_interleave(factor)
                    expected_cols = torch.arange(left, left + factor, dtype=torch.float64).repeat(factor)
                    assert torch.equal(window[:, 0], expected_rows)
                    assert torch.equal(window[:, 1], expected_cols)
                    assert pooled[view, i * GRID + j, 0] == pytest.approx(top + (factor - 1) / 2)
                    assert pooled[view, i * GRID + j, 1] == pytest.approx(left + (factor - 1) / 2)


@pytest.mark.parametrize("original_size", [(1123, 794), (1800, 300), (200, 1600), (200, 150)])
@pytest.mark.parametrize("stage", range(4))
def test_global_view_sees_the_image_not_the_padding(original_size, stage):
    geometry = highres_geometry(original_size)
    height, width = stage_map_size(geometry.canvas_size, STAGE_STRIDES[stage])
    # The cells any part of which covers the image, computed from pixel geometry.
    left, top, right, bottom = geometry.image_box_on_canvas()
    cell_h, cell_w = geometry.canvas_size[0] / height, geometry.canvas_size[1] / width
    row0, row1 = math.floor(top / cell_h), math.ceil(bottom / cell_h)
    col0, col1 = math.floor(left / cell_w), math.ceil(right / cell_w)
    indicator = torch.zeros(1, height, width, dtype=torch.float64)
    indicator[:, row0:row1, col0:col1] = 1.0
    stage_map = torch.cat([indicator, coordinate_map(height, width)])
    pooled = align_stage(stage_map, geometry, GRID)[0]  # the global view, [576, 3]
    assert torch.all(pooled[:, 0] == 1.0), "a padding cell leaked into the global view"
    # ... and the whole image region is used, edge to edge.
    region_h, region_w = row1 - row0, col1 - col0
    assert pooled[:, 1].min() <= row0 + region_h / GRID and pooled[:, 1].max() >= row1 - 1 - region_h / GRID
    assert pooled[:, 2].min() <= col0 + region_w / GRID and pooled[:, 2].max() >= col1 - 1 - region_w / GRID


def test_stage_map_that_does_not_tile_is_rejected():
    geometry = highres_geometry((800, 800))
    with pytest.raises(ValueError):
        align_stage(torch.zeros(2, 50, 50), geometry, GRID)


def random_original_sizes(count=400, seed=0):
    rng = random.Random(seed)
    sizes = [(1123, 794), (794, 1123), (1800, 300), (200, 1600), (200, 150), (1, 1), (1, 5000), (5000, 1)]
    sizes += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(count)]
    return sizes


def test_highres_geometry_is_the_vit_geometry_scaled():
    """The rule of scale_geometry, over many page shapes: crops scale exactly to whole cells of
    every stage; each edge of the page lies within half a high-resolution pixel of the ViT's edge
    times 32/14; the page stays on the canvas."""
    for original_size in random_original_sizes():
        vit = plan_canvas(original_size, AnyresConfig())
        high = scale_geometry(vit, SCALE)
        assert high.original_size == vit.original_size and high.grid == vit.grid
        assert high.canvas_size == (vit.canvas_size[0] * 16 // 7, vit.canvas_size[1] * 16 // 7)
        assert high.crop_size == 768 and all(high.crop_size % (GRID * s) == 0 for s in STAGE_STRIDES)
        for high_box, vit_box in zip(high.crop_boxes_on_canvas(), vit.crop_boxes_on_canvas()):
            assert all(Fraction(h) == v * SCALE for h, v in zip(high_box, vit_box))
        for high_edge, vit_edge in zip(high.image_box_on_canvas(), vit.image_box_on_canvas()):
            assert abs(high_edge - vit_edge * SCALE) <= Fraction(1, 2)
        left, top, right, bottom = high.image_box_on_canvas()
        assert 0 <= left < right <= high.canvas_size[1] and 0 <= top < bottom <= high.canvas_size[0]
