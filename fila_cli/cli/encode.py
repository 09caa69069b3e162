"""`fila encode`: one page in, its FILA visual tokens out (.safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fila_cli.cli.options import (
    DeviceOption,
    DtypeOption,
    FusionOption,
    ModelOption,
    PasswordOption,
    VisionMmprojOption,
    vision_weights,
)
from fila_cli.cli.support import FILE_HELP, QuietVerboseOption, handle_errors, stderr


def encode(
    file: Annotated[Path, typer.Argument(metavar="FILE", help=FILE_HELP, show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="Where to write the visual tokens (.safetensors); its folder must exist.", show_default=False)],
    page: Annotated[int, typer.Option("--pages", "--page", "-p", metavar="N", help="Page of a PDF to encode, 1-based (one page).")] = 1,
    model: ModelOption = None,
    mmproj: VisionMmprojOption = None,
    fusion: FusionOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    password: PasswordOption = None,
    verbose: QuietVerboseOption = False,
) -> None:
    """Encode one page into FILA visual tokens.

    Writes OUT.safetensors holding `visual_tokens` (float32, n_tokens x d: the global view first, then
    the unpadded crop grid with one newline token per row) and metadata: file, page, canvas, grid,
    n_tokens, and the identities of the vision and fusion weights. --model takes a bundle or a
    `fila train` run directory (only its vision and fusion weights are used: no LLM needed).
    """
    with handle_errors(verbose):
        from fila_cli.vision.devices import pick_device, pick_dtype
        from fila_cli.vision.encode import check_output_path, encode_page, save_visual_tokens, token_metadata
        from fila_cli.vision.load import load_encoder
        from fila_cli.vision.loaders.identity import file_identity

        check_output_path(output)  # a bad -o fails now, not after loading and encoding
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        if not file.exists():
            from fila_cli.errors import DocumentError

            raise DocumentError(f"{file}: no such file; check the path")
        vision, fusion = vision_weights(model, mmproj, fusion)
        encoder = load_encoder(vision, fusion, device=torch_device, dtype=torch_dtype)
        result = encode_page(file, page, encoder, password=password)
        metadata = token_metadata(result, file, file_identity(vision), file_identity(fusion) if fusion else None, torch_dtype)
        save_visual_tokens(output, result.page.tokens, metadata)
        rows, cols = result.page.geometry.grid
        if encoder.highres_scale is not None:
            from fila_cli.documents.canvas import scale_geometry

            high_h, high_w = scale_geometry(result.page.geometry, encoder.highres_scale).canvas_size
            fusion_state = f"fusion on, ConvNeXt {high_w}x{high_h}"
        else:
            fusion_state = "fusion off"
        stderr.print(
            f"{output}: {result.page.n_tokens} visual tokens from page {page} "
            f"(canvas {metadata['canvas']}, {rows}x{cols} crops, {fusion_state}; "
            f"render {result.render_s:.2f}s, encode {result.encode_s:.2f}s on {torch_device.type}/{metadata['dtype']})"
        )
