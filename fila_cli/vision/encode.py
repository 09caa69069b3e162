"""Encode one document page into visual tokens and save them (``fila encode``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from fila_cli.atomic_files import atomic_path, check_output_folder
from fila_cli.config import AnyresConfig
from fila_cli.documents.document import open_document, page_index_from_user
from fila_cli.documents.render import render_for_canvas
from fila_cli.errors import UsageError
from fila_cli.vision.model.encoder import EncodedPage, HybridEncoder

VISUAL_TOKENS_KEY = "visual_tokens"
OUTPUT_SUFFIX = ".safetensors"


@dataclass
class EncodeResult:
    page: EncodedPage
    page_number: int  # 1-based
    render_s: float
    encode_s: float
    metadata: dict[str, str] = field(default_factory=dict)


def render_page(path: str | Path, page_number: int, anyres: AnyresConfig, highres_scale: Fraction | None = None,
                password: str | None = None) -> Image.Image:
    """Page ``page_number`` (1-based) of a PDF, or an image, as the encoder takes it: with
    ``highres_scale`` (fusion on) at the ConvNeXt's zoom. Training reads its samples' pages through
    this too, so it sees what inference sees."""
    with open_document(path, password=password) as document:
        index = page_index_from_user(page_number, document.page_count, name=path)
        return render_for_canvas(document, index, anyres, highres_scale)


def encode_page(path: str | Path, page_number: int, encoder: HybridEncoder, password: str | None = None) -> EncodeResult:
    """Render page ``page_number`` (1-based) of a PDF, or an image, and encode it."""
    started = time.perf_counter()
    image = render_page(path, page_number, encoder.anyres, encoder.highres_scale, password=password)
    rendered = time.perf_counter()
    page = encoder.encode(image)
    encoded = time.perf_counter()
    return EncodeResult(page=page, page_number=page_number, render_s=rendered - started, encode_s=encoded - rendered)


def token_metadata(result: EncodeResult, file: Path, vision_identity: str, fusion_identity: str | None, dtype: torch.dtype) -> dict[str, str]:
    """Everything a reader of the .safetensors needs to interpret the tokens (safetensors metadata is str -> str)."""
    geometry = result.page.geometry
    rows, cols = geometry.grid
    return {
        "format": "fila-visual-tokens",
        "file": str(file),
        "page": str(result.page_number),
        "image_size": f"{geometry.original_size[1]}x{geometry.original_size[0]}",
        "canvas": f"{geometry.canvas_size[1]}x{geometry.canvas_size[0]}",
        "grid": f"{rows}x{cols}",
        "n_tokens": str(result.page.n_tokens),
        "vision_weights": vision_identity,
        "fusion_weights": fusion_identity or "none",
        "dtype": str(dtype).removeprefix("torch."),
    }


def check_output_path(output: str | Path) -> Path:
    """UsageError unless ``output`` can be written as a .safetensors file; checked before any slow work."""
    output = Path(output)
    if output.suffix != OUTPUT_SUFFIX:
        raise UsageError(f"{output}: the output must be a {OUTPUT_SUFFIX} file; name it *{OUTPUT_SUFFIX}")
    check_output_folder(output)
    return output


def save_visual_tokens(output: str | Path, tokens: torch.Tensor, metadata: dict[str, str]) -> None:
    output = check_output_path(output)
    with atomic_path(output) as temporary:  # an interrupted run never leaves a half-written file
        save_file({VISUAL_TOKENS_KEY: tokens.float().contiguous()}, str(temporary), metadata=metadata)
