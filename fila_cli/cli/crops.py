"""`fila crops`: a picture of how a page is cut into crops, and where a text lies on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fila_cli.cli.options import FusionOption, PasswordOption, VisionMmprojOption, vision_weights
from fila_cli.cli.support import FILE_HELP, QuietVerboseOption, handle_errors, stderr

CROPS_EPILOG = (
    "The PNG has the size of the page as the model receives it. Text crossed by a red line is split between "
    "two crops: the case FILA's whole-page ConvNeXt branch exists for. With --find the picture outlines TEXT, "
    "red where a crop boundary cuts it, green inside one crop; --json prints the places as one JSON object "
    "(docs/model.md)."
)


def crops(
    file: Annotated[Path, typer.Argument(metavar="FILE", help=FILE_HELP, show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE.png", help="Where to write the picture (its folder must exist); optional with --find.", show_default=False)] = None,
    page: Annotated[int | None, typer.Option("--pages", "--page", "-p", metavar="N", help="Page of a PDF, 1-based, one page (default: 1, or with --find the first page where TEXT is).", show_default=False)] = None,
    find: Annotated[str | None, typer.Option("--find", "-f", metavar="TEXT", help="Locate TEXT on the page (no model needed; OCR on scans when Tesseract is installed) and say which crops it touches.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --find: print one JSON object on stdout.")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Take the canvases (and fusion weights, if any) from this bundle or training run (default: LLaVA-1.6's five canvases).", show_default=False)] = None,
    mmproj: VisionMmprojOption = None,
    fusion: FusionOption = None,
    password: PasswordOption = None,
    verbose: QuietVerboseOption = False,
) -> None:
    """Draw how a page is cut: crop boundaries (red) and the global view (blue) on the page."""
    with handle_errors(verbose):
        from fila_cli.atomic_files import check_output_folder
        from fila_cli.cli.crops_view import describe_resolutions, draw_crops, draw_evidence
        from fila_cli.config import AnyresConfig
        from fila_cli.documents.canvas import plan_canvas, scale_geometry
        from fila_cli.documents.document import open_document, page_index_from_user
        from fila_cli.documents.render import render_for_canvas
        from fila_cli.errors import UsageError

        if output is None and find is None:
            raise UsageError("pass --output FILE.png for the picture (or --find TEXT to locate text)")
        if output is not None and output.suffix.lower() != ".png":
            raise UsageError(f"{output}: the picture is written as PNG; name it *.png")
        if output is not None:
            check_output_folder(output)
        if as_json and find is None:
            raise UsageError("--json goes with --find TEXT: the picture itself is written with --output")
        if find is not None and not find.strip():
            raise UsageError("--find: the text is empty; pass the text to locate")
        if page is not None and page < 1:
            raise UsageError(f"--pages {page}: pages are numbered from 1")
        config = AnyresConfig()
        if model is not None or mmproj is not None:
            from fila_cli.vision.load import load_vision_weights

            vision, fusion = vision_weights(model, mmproj, fusion)
            weights = load_vision_weights(vision)
            config = AnyresConfig(crop_size=weights.clip_config.image_size, image_grid_pinpoints=weights.image_grid_pinpoints)
        highres_scale = None
        if fusion is not None:
            from fila_cli.vision.loaders.fusion_weights import load_fusion_config

            highres_scale = load_fusion_config(fusion).convnext.input_scale()
        with open_document(file, password=password) as document:
            evidence = None
            if page is not None:
                index = page_index_from_user(page, document.page_count, name=file)
            if find is not None:
                from fila_cli.documents.evidence import locate_answer

                pages = [index] if page is not None else range(document.page_count)
                evidence = locate_answer(document, pages, find, config)
                if page is None:
                    index = evidence.boxes[0].page - 1 if evidence.boxes else 0
            elif page is None:
                index = 0
            image = render_for_canvas(document, index, config, highres_scale)
            page_size = document.page_size_points(index)
        geometry = plan_canvas((image.height, image.width), config)
        highres = scale_geometry(geometry, highres_scale) if highres_scale is not None else None
        rows, cols = geometry.grid
        if output is not None:
            picture = (draw_crops(image, geometry, highres) if evidence is None
                       else draw_evidence(image, geometry, evidence.on_page(index + 1), page_size, highres))
            try:
                picture.save(output)
            except OSError as error:
                raise UsageError(f"{output}: cannot write it ({error.strerror or error}); check the folder") from None
            stderr.print(f"{output}: page {index + 1}, {image.width}x{image.height} px, {describe_resolutions(geometry, highres)}, {rows}x{cols} crops")
        if evidence is not None:
            from fila_cli.cli.crops_view import print_found

            print_found(file, find, index + 1, geometry, evidence, as_json)
