"""Dynamic cropping ("anyres"), as LLaVA-NeXT does it.

A page is resized (keeping its aspect ratio) into the best of a few canvases, padded to the canvas
centred, and cut into crop_size x crop_size crops in row-major order; a global view is the whole
page squashed to one crop. Pixel values match HF transformers' ``LlavaNextImageProcessor``
(torchvision backend): the same bicubic, antialiased resize of uint8 pixels, zero padding, then
normalisation. The three steps are torchvision's own kernels' torch calls, written out here
(``resize_uint8``): importing torchvision costs a second of start-up (its package imports its
models, ops and torch._dynamo), and ``tests/test_anyres.py`` holds the pixels equal to HF's.

With fusion on, the same original pixels are also resized into the ConvNeXt's high-resolution
canvas (the ViT canvas x 32/14, geometry from ``scale_geometry``) with the same resize: never an
upscale of the ViT canvas, which holds no detail the crops lack.

On a GPU (``device=``), the uint8 page is copied there once and every step runs there, as HF's
processor does when given a device: the resize then goes through float32 (no uint8 kernel off the
CPU), exactly as torchvision computes it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fila_cli.config import AnyresConfig

# The canvas arithmetic lives with the documents (rendering needs it without torch); re-exported here.
from fila_cli.documents.canvas import (
    CanvasGeometry,
    plan_canvas,
    scale_geometry,
)

_RESAMPLE = "bicubic"
_RESCALE_FACTOR = 1.0 / 255.0  # uint8 -> [0, 1]


@dataclass
class HighResCanvas:
    """The page on the ConvNeXt's high-resolution canvas."""

    # [3, H, W] = [3, canvas_h * scale, canvas_w * scale]: normalised, padded centred.
    pixels: torch.Tensor
    # Where the page sits on it (canvas, crops and image box in high-resolution pixels).
    geometry: CanvasGeometry


@dataclass
class AnyresImage:
    """A page ready for the vision tower (and, with fusion on, the ConvNeXt)."""

    # [1 + rows*cols, 3, crop, crop]: the global view first, then the crops row-major.
    views: torch.Tensor
    # [3, canvas_h, canvas_w]: the normalised, padded canvas the crops were cut from.
    canvas: torch.Tensor
    geometry: CanvasGeometry
    # The ConvNeXt's input; None when preprocessed without a high-resolution scale (fusion off).
    highres: HighResCanvas | None = None


def image_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W] RGB."""
    array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, config: AnyresConfig) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> the model's float32 input."""
    # Rescale and normalise fused, in float32, with the statistics computed exactly as HF's
    # torchvision backend computes them, so the pixel values are bit-identical.
    mean = torch.tensor(config.image_mean, device=pixels.device) * (1.0 / _RESCALE_FACTOR)
    std = torch.tensor(config.image_std, device=pixels.device) * (1.0 / _RESCALE_FACTOR)
    # [3] -> [3, 1, 1]; subtract then divide, as torchvision's normalize does.
    return pixels.to(torch.float32).sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def resize_uint8(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w]: antialiased bicubic, exactly as torchvision's
    ``resize(..., BICUBIC, antialias=True)`` computes it (its ``resize_image``, v0.19-0.29)."""
    if tuple(size) == tuple(pixels.shape[-2:]):
        return pixels
    channels, height, width = pixels.shape
    batch = pixels.reshape(1, channels, height, width)
    if batch.is_contiguous(memory_format=torch.channels_last) and pixels.numel() != batch.stride(0):
        # An HWC array seen as CHW: restride the fake batch dimension so that interpolate keeps
        # channels-last: torchvision's workaround for pytorch#68430, kept so the kernel sees the
        # layout it sees under torchvision.
        batch = batch.as_strided(batch.shape, (pixels.numel(), *batch.stride()[1:]))
    if pixels.device.type == "cpu":
        # torch's CPU kernel takes uint8 directly (and rounds inside).
        return F.interpolate(batch, size=list(size), mode=_RESAMPLE, align_corners=False, antialias=True)[0]
    return resize_uint8_through_float32(batch, size)[0]


def resize_uint8_through_float32(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> uint8 [n, 3, h, w] as torchvision resizes uint8 where torch has no uint8
    kernel (GPUs): in float32, then clamped (bicubic overshoots), rounded and cast back."""
    resized = F.interpolate(batch.to(torch.float32), size=list(size), mode=_RESAMPLE, align_corners=False,
                            antialias=True)
    return resized.clamp_(0, 255).round_().to(torch.uint8)


def pixels_on(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [3, H, W] on the CPU -> on ``device``. To a GPU through pinned memory: one DMA copy of
    the uint8 page (a quarter of its float32 bytes), not a staging copy through pageable memory."""
    if device.type == "cpu":
        return pixels
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    return pixels.to(device, non_blocking=True)


@dataclass
class RenderedPage:
    """A page's pixels on the ViT canvas and the high-resolution canvas, uint8, not yet normalised:
    what training caches per page (a quarter of the float32 bytes). ``normalized`` finishes it into
    exactly what ``preprocess`` returns (normalisation is per pixel, so its order does not matter)."""

    global_view: torch.Tensor  # uint8 [3, crop, crop]: the whole page squashed to one crop
    canvas: torch.Tensor  # uint8 [3, canvas_h, canvas_w], padded with zeros
    geometry: CanvasGeometry
    highres: torch.Tensor | None = None  # uint8 [3, H, W] (fusion on)
    highres_geometry: CanvasGeometry | None = None

    def normalized(self, config: AnyresConfig, device: torch.device | str | None = None) -> AnyresImage:
        def finish(pixels: torch.Tensor) -> torch.Tensor:
            return normalize(pixels if device is None else pixels.to(device), config)

        s = config.crop_size
        rows, cols = self.geometry.grid
        canvas = finish(self.canvas)
        # [3, rows*s, cols*s] -> [rows*cols, 3, s, s], row-major.
        crops = canvas.reshape(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        views = torch.cat([finish(self.global_view)[None], crops], dim=0)
        highres = None
        if self.highres is not None:
            assert self.highres_geometry is not None
            highres = HighResCanvas(finish(self.highres), self.highres_geometry)
        return AnyresImage(views=views, canvas=canvas, geometry=self.geometry, highres=highres)


def _pad(resized: torch.Tensor, geometry: CanvasGeometry) -> torch.Tensor:
    canvas_h, canvas_w = geometry.canvas_size
    pad_bottom = canvas_h - geometry.resized_size[0] - geometry.pad_top
    pad_right = canvas_w - geometry.resized_size[1] - geometry.pad_left
    # F.pad takes (left, right, top, bottom) for the last two dimensions.
    return F.pad(resized, (geometry.pad_left, pad_right, geometry.pad_top, pad_bottom), value=0)


def render_uint8(image: Image.Image, config: AnyresConfig | None = None, highres_scale: Fraction | None = None,
                 device: torch.device | str = "cpu") -> RenderedPage:
    """Page image -> its uint8 global view, canvas and (``highres_scale``) high-resolution canvas."""
    config = config or AnyresConfig()
    pixels = pixels_on(image_to_uint8_tensor(image), torch.device(device))  # [3, H, W] uint8
    geometry = plan_canvas((pixels.shape[1], pixels.shape[2]), config)
    canvas = _pad(resize_uint8(pixels, geometry.resized_size), geometry)
    global_view = resize_uint8(pixels, (config.crop_size, config.crop_size))
    highres, highres_geometry = None, None
    if highres_scale is not None:
        highres_geometry = scale_geometry(geometry, highres_scale)
        highres = _pad(resize_uint8(pixels, highres_geometry.resized_size), highres_geometry)
    return RenderedPage(global_view, canvas, geometry, highres, highres_geometry)


def preprocess(image: Image.Image, config: AnyresConfig | None = None, highres_scale: Fraction | None = None,
               device: torch.device | str = "cpu") -> AnyresImage:
    """Page image -> global view + crops + canvas, normalised float32, on ``device``.

    ``highres_scale`` (fusion on; 32/14 for FILA): also the ConvNeXt's high-resolution canvas,
    resized from the same original pixels. Pass the original (or a PDF render at the
    high-resolution zoom, ``render_for_canvas(..., highres_scale)``), not something already
    shrunk to the ViT canvas, or the ConvNeXt sees no more than the crops do.
    """
    config = config or AnyresConfig()
    return render_uint8(image, config, highres_scale, device).normalized(config)
