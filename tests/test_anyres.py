"""Cropping equals HF transformers' LlavaNextImageProcessor, pixel for pixel."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaNextImageProcessor

from fila_cli.config import AnyresConfig
from fila_cli.documents.canvas import select_best_resolution
from fila_cli.vision.anyres import plan_canvas, preprocess
from tests.helpers.tiny_vision import PAGE_SHAPES, page_image


@pytest.fixture(scope="module")
def hf_processor() -> LlavaNextImageProcessor:
    # LLaVA-1.6's processor settings.
    return LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


@pytest.mark.parametrize("shape_name", sorted(PAGE_SHAPES))
def test_pixels_identical_to_hf(shape_name, hf_processor):
    height, width = PAGE_SHAPES[shape_name]
    image = page_image(height, width, seed=1)
    expected = hf_processor(image, return_tensors="pt")["pixel_values"][0]
    ours = preprocess(image, AnyresConfig())
    assert ours.views.shape == expected.shape
    assert torch.equal(ours.views, expected)


def test_canvas_choice_follows_aspect_ratio():
    config = AnyresConfig()
    assert plan_canvas((1800, 300), config).canvas_size == (1008, 336)
    assert plan_canvas((200, 1600), config).canvas_size == (336, 1008)
    assert plan_canvas((1123, 794), config).canvas_size == (672, 672)
    # Tie on effective resolution -> least waste: a 336x672 image fits 336x672 exactly.
    assert select_best_resolution((336, 672), config.image_grid_pinpoints) == (336, 672)


def test_padding_is_centred_and_crops_tile_the_canvas():
    image = page_image(1800, 300)
    page = preprocess(image, AnyresConfig())
    geometry = page.geometry
    left, _top, right, _bottom = geometry.image_box_on_canvas()
    canvas_w = geometry.canvas_size[1]
    assert abs(left - (canvas_w - right)) <= 1
    rows, cols = geometry.grid
    assert (rows, cols) == (3, 1)
    for index, (x0, y0, x1, y1) in enumerate(geometry.crop_boxes_on_canvas()):
        assert torch.equal(page.views[1 + index], page.canvas[:, y0:y1, x0:x1])


def test_configurable_grid():
    config = AnyresConfig(image_grid_pinpoints=[[336, 336], [672, 1008]])
    page = preprocess(page_image(700, 1000), config)
    assert page.geometry.canvas_size == (672, 1008)
    assert page.views.shape[0] == 1 + 6
    with pytest.raises(ValueError):
        AnyresConfig(image_grid_pinpoints=[[300, 336]])


def test_the_gpu_resize_is_torchvisions_float32_path(monkeypatch):
    """Off the CPU, torchvision resizes uint8 through float32 (no uint8 kernel there), and so does
    fila on a GPU (``resize_uint8_through_float32``). Held bit for bit here on the CPU, with
    torchvision sent down that same path."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf
    from torchvision.transforms.v2.functional import _geometry

    from fila_cli.vision.anyres import image_to_uint8_tensor, resize_uint8, resize_uint8_through_float32

    monkeypatch.setattr(_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: False)
    pixels = image_to_uint8_tensor(page_image(333, 517, seed=4))
    for size in ((336, 336), (251, 390), (700, 1100)):  # down, down unevenly, up
        expected = tvf.resize(pixels, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        got = resize_uint8_through_float32(pixels[None], size)[0]
        assert torch.equal(got, expected)
        # and it is a different computation from the CPU's uint8 kernel (else this test proves nothing)
        assert not torch.equal(got, resize_uint8(pixels, size))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape_name", sorted(PAGE_SHAPES))
def test_gpu_preprocessing_is_hf_processor_on_the_gpu(shape_name, hf_processor):
    image = page_image(*PAGE_SHAPES[shape_name], seed=1)
    expected = hf_processor(image, return_tensors="pt", device="cuda")["pixel_values"][0]
    ours = preprocess(image, AnyresConfig(), device="cuda")
    assert ours.views.device.type == "cuda" and ours.views.shape == expected.shape
    assert (ours.views - expected.to(ours.views.device)).abs().max().item() <= 1e-6
