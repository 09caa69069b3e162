"""The ``fila`` command line: a thin layer over the library (``from fila_cli import ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_support import EXIT_CODES_HELP, VerboseOption, handle_errors, stderr

app = typer.Typer(
    name="fila",
    help="Answer questions about documents with a local FILA vision-language model.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

DeviceOption = Annotated[str, typer.Option("--device", help="Where the vision encoder runs: auto (best present), cpu, cuda or mps.")]
DtypeOption = Annotated[
    str, typer.Option("--dtype", help="Vision encoder precision: auto (bfloat16 on GPUs and on CPUs with AMX/AVX512-BF16), float32, bfloat16.")
]
PasswordOption = Annotated[Optional[str], typer.Option("--password", help="Password of an encrypted PDF.")]


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"fila {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Answer questions about documents with a local FILA vision-language model."""


@app.command(epilog=EXIT_CODES_HELP)
def encode(
    file: Annotated[Path, typer.Argument(help="A PDF, or an image (PNG, JPEG, WebP, TIFF).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the visual tokens (.safetensors).", show_default=False)],
    mmproj: Annotated[Path, typer.Option("--mmproj", help="Vision weights: an mmproj GGUF, or a LLaVA-NeXT safetensors checkpoint.", show_default=False)],
    page: Annotated[int, typer.Option("--page", "-p", help="Page of a PDF to encode, 1-based.")] = 1,
    fusion: Annotated[Optional[Path], typer.Option("--fusion", help="FILA fusion weights (.safetensors with its .json config). Without them fusion is off and the ConvNeXt branch does not run.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    password: PasswordOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Encode one page into FILA visual tokens.

    Writes OUT.safetensors holding `visual_tokens` (float32, n_tokens x d: the global view first, then
    the unpadded crop grid with one newline token per row) and metadata: file, page, canvas, grid,
    n_tokens, and the identities of the vision and fusion weights.
    """
    with handle_errors(verbose):
        from .devices import pick_device, pick_dtype
        from .encode import encode_page, save_visual_tokens, token_metadata
        from .loaders.identity import file_identity
        from .vision import load_encoder

        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        if not file.exists():
            from .errors import DocumentError

            raise DocumentError(f"{file}: no such file; check the path")
        encoder = load_encoder(mmproj, fusion, device=torch_device, dtype=torch_dtype)
        result = encode_page(file, page, encoder, password=password)
        metadata = token_metadata(result, file, file_identity(mmproj), file_identity(fusion) if fusion else None, torch_dtype)
        save_visual_tokens(output, result.page.tokens, metadata)
        rows, cols = result.page.geometry.grid
        stderr.print(
            f"{output}: {result.page.n_tokens} visual tokens from page {page} "
            f"(canvas {metadata['canvas']}, {rows}x{cols} crops, {'fusion on' if encoder.fusion_enabled else 'fusion off'}; "
            f"render {result.render_s:.2f}s, encode {result.encode_s:.2f}s on {torch_device.type}/{metadata['dtype']})"
        )


@app.command(epilog=EXIT_CODES_HELP)
def crops(
    file: Annotated[Path, typer.Argument(help="A PDF, or an image (PNG, JPEG, WebP, TIFF).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the picture (.png).", show_default=False)],
    page: Annotated[int, typer.Option("--page", "-p", help="Page of a PDF, 1-based.")] = 1,
    password: PasswordOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Draw how a page is cut: crop boundaries (red) and the global view (blue) on the page.

    The PNG has the size of the page as the model receives it. Text crossed by a red line is split
    between two crops: the case FILA's whole-page ConvNeXt branch exists for.
    """
    with handle_errors(verbose):
        from .anyres import plan_canvas
        from .config import AnyresConfig
        from .crops_view import draw_crops
        from .documents import open_document, page_index_from_user
        from .errors import UsageError
        from .render import render_for_canvas

        if output.suffix.lower() != ".png":
            raise UsageError(f"{output}: the picture is written as PNG; name it *.png")
        config = AnyresConfig()
        with open_document(file, password=password) as document:
            image = render_for_canvas(document, page_index_from_user(page, document.page_count, name=file), config)
        geometry = plan_canvas((image.height, image.width), config)
        draw_crops(image, geometry).save(output)
        rows, cols = geometry.grid
        stderr.print(f"{output}: page {page}, {image.width}x{image.height} px, canvas {geometry.canvas_size[1]}x{geometry.canvas_size[0]}, {rows}x{cols} crops")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
