"""The ``fila`` command line: a thin layer over the library (``from fila_cli import ...``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from fila_cli.cli import serve as serve_command
from fila_cli.cli.options import (
    CacheMaxGbOption,
    CompileOption,
    CtxSizeOption,
    DeviceOption,
    DtypeOption,
    EvidenceOcrOption,
    FusionOption,
    GpuLayersOption,
    LlmOption,
    MaxTokensOption,
    MmprojOption,
    ModelOption,
    NoCacheOption,
    PasswordOption,
    SeedOption,
    ServerOption,
    TemperatureOption,
    TemplateOption,
    TextLayerOption,
    TopPOption,
    ask_options,
    model_options,
)
from fila_cli.cli.support import EXIT_CODES_HELP, VerboseOption, handle_errors, stderr
from fila_cli.llm.sampling import SamplingParams
from fila_cli.qa.options import DEFAULT_PIPELINE_DEPTH, DEFAULT_RAY_CPUS, DEFAULT_TIMEOUT_S, BatchOptions, ModelOptions

# The main job first, then the tools around it.
COMMAND_ORDER = ("ask", "chat", "batch", "serve", "sample", "crops", "encode", "eval", "train", "weights", "cache")


class _MainJobFirst(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        rank = {name: index for index, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))


app = typer.Typer(
    name="fila",
    cls=_MainJobFirst,
    help="Answer questions about documents with a local FILA vision-language model.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

def _mount_weights_app() -> None:
    from fila_cli.cli.weights import weights_app

    app.add_typer(weights_app, name="weights", help="List, download, inspect and verify model bundles.")


def _mount_train_app() -> None:
    from fila_cli.cli.train import train_app

    app.add_typer(train_app, name="train", help="Train FILA's fusion (and LLM) from LLaVA-NeXT weights; export a bundle.")


_mount_weights_app()
_mount_train_app()


def _mount_eval_app() -> None:
    from fila_cli.cli.eval_output import eval_app

    app.add_typer(eval_app, name="eval")


_mount_eval_app()

serve_command.mount(app)

def _version(value: bool) -> None:
    if value:
        from fila_cli import __version__

        print(f"fila {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Answer questions about documents with a local FILA vision-language model."""


def _vision_weights(model: str | None, mmproj: Path | None, fusion: Path | None) -> tuple[Path, Path | None]:
    """The vision weights to use: --mmproj [--fusion] as given, else the bundle's."""
    if mmproj is not None:
        return mmproj, fusion
    from fila_cli.bundles.bundle import resolve_bundle

    bundle = resolve_bundle(model, fusion=fusion)
    return bundle.vision, bundle.fusion


@app.command(epilog=EXIT_CODES_HELP)
def encode(
    file: Annotated[Path, typer.Argument(help="A PDF, or an image (PNG, JPEG, WebP, TIFF).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the visual tokens (.safetensors).", show_default=False)],
    page: Annotated[int, typer.Option("--page", "-p", help="Page of a PDF to encode, 1-based.")] = 1,
    model: ModelOption = None,
    mmproj: MmprojOption = None,
    fusion: FusionOption = None,
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
        vision, fusion = _vision_weights(model, mmproj, fusion)
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


@app.command(epilog=EXIT_CODES_HELP)
def crops(
    file: Annotated[Path, typer.Argument(help="A PDF, or an image (PNG, JPEG, WebP, TIFF).", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the picture (.png); optional with --find.", show_default=False)] = None,
    page: Annotated[int | None, typer.Option("--page", "-p", help="Page of a PDF, 1-based (default: 1, or with --find the first page where TEXT is).", show_default=False)] = None,
    find: Annotated[str | None, typer.Option("--find", "-f", help="Locate TEXT on the page (exact, normalised or partial match) and say which crops it touches.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --find: print one JSON object on stdout.")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Take the canvases (and fusion weights, if any) from this bundle (default: the paper's five canvases, as LLaVA-1.6).")] = None,
    mmproj: MmprojOption = None,
    fusion: FusionOption = None,
    password: PasswordOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Draw how a page is cut: crop boundaries (red) and the global view (blue) on the page.

    The PNG has the size of the page as the model receives it. Text crossed by a red line is split
    between two crops: the case FILA's whole-page ConvNeXt branch exists for. With fusion weights
    (--fusion, or a bundle that has them) the page is rendered at the ConvNeXt's high resolution and
    both resolutions are stated.

    --find TEXT locates TEXT (no model needed; scanned pages by OCR when Tesseract is installed) and
    prints where it lies and which crops it touches; the picture outlines it, red where a crop
    boundary cuts it, green inside one crop. With --json: {"file", "find", "page", "canvas", "grid",
    "evidence": [{"page", "bbox_pt", "bbox_px", "text", "match", "crops", "straddles_crop_boundary", "source"}],
    "evidence_reason"}.
    """
    with handle_errors(verbose):
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
        if as_json and find is None:
            raise UsageError("--json goes with --find TEXT: the picture itself is written with --output")
        if find is not None and not find.strip():
            raise UsageError("--find: the text is empty; pass the text to locate")
        config = AnyresConfig()
        if model is not None or mmproj is not None:
            from fila_cli.vision.load import load_vision_weights

            vision, fusion = _vision_weights(model, mmproj, fusion)
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
            if evidence is None:
                draw_crops(image, geometry, highres).save(output)
            else:
                draw_evidence(image, geometry, evidence.on_page(index + 1), page_size, highres).save(output)
            stderr.print(f"{output}: page {index + 1}, {image.width}x{image.height} px, {describe_resolutions(geometry, highres)}, {rows}x{cols} crops")
        if evidence is not None:
            from fila_cli.cli.crops_view import print_found

            print_found(file, find, index + 1, geometry, evidence, as_json)


def _read_question(question: str) -> str:
    import sys

    from fila_cli.errors import UsageError

    text = sys.stdin.read() if question == "-" else question
    if not text.strip():
        raise UsageError("the question is empty: pass it as an argument, or '-' to read it from stdin")
    return text.strip()


@app.command(epilog=EXIT_CODES_HELP)
def ask(
    file: Annotated[Path, typer.Argument(help="A PDF, or an image (PNG, JPEG, WebP, TIFF).", show_default=False)],
    question: Annotated[str, typer.Argument(help="The question, or - to read it from stdin.", show_default=False)],
    model: ModelOption = None,
    llm: LlmOption = None,
    mmproj: MmprojOption = None,
    fusion: FusionOption = None,
    pages: Annotated[str | None, typer.Option("--pages", help="Pages to read, 1-based, e.g. 1,3-5. Default: fila chooses (by the text layer, else the most confident page).")] = None,
    password: PasswordOption = None,
    text_layer: TextLayerOption = False,
    together: Annotated[bool, typer.Option("--together", help="Read the --pages in one prompt, each introduced by its page number (for questions across pages), when the model's context holds them.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (the default when stdout is not a terminal).")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the answer when it is complete instead of as it is generated.")] = False,
    server: ServerOption = None,
    keep_alive: Annotated[str | None, typer.Option("--keep-alive", envvar="FILA_KEEP_ALIVE", help="Keep the model loaded in a background server for this long after the last ask (e.g. 5m; $FILA_KEEP_ALIVE): later asks with the same model skip the load. See `fila serve`.", show_default=False)] = None,
    show_evidence: Annotated[Path | None, typer.Option("--show-evidence", help="Write the page where the answer is (PNG) with the crop boundaries and the answer's evidence boxes, red where a boundary cuts them (as `fila crops --find`).", show_default=False)] = None,
    evidence_ocr: EvidenceOcrOption = False,
    temperature: TemperatureOption = SamplingParams.temperature,
    top_p: TopPOption = SamplingParams.top_p,
    seed: SeedOption = SamplingParams.seed,
    max_tokens: MaxTokensOption = SamplingParams.max_tokens,
    ctx_size: CtxSizeOption = ModelOptions.ctx_size,
    template: TemplateOption = ModelOptions.template,
    gpu_layers: GpuLayersOption = ModelOptions.gpu_layers,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    no_cache: NoCacheOption = False,
    cache_max_gb: CacheMaxGbOption = ModelOptions.cache_max_gb,
    verbose: VerboseOption = False,
) -> None:
    """Answer a QUESTION about FILE, citing the page the answer came from.

    On a terminal the answer is shown in a panel, streamed as it is generated. Piped, or with --json,
    stdout holds exactly one JSON object: {"file", "question", "answer", "pages", "confidence", "model",
    "timings": {"render_s", "encode_s", "prefill_s", "generate_s"}, "tokens": {"visual", "prompt", "generated"},
    "page_choice": {"method", "detail"}, "warnings": [...], "evidence": [{"page", "bbox_pt", "bbox_px", "text",
    "match", "crops", "straddles_crop_boundary", "source"}], "evidence_reason", "error": null}; when it fails,
    the same keys with "error": {"kind", "message"} and the others null. A damaged document is answered
    with a `fila: warning: ...` line on stderr; an answer a crop boundary cuts (fusion off), with a
    `fila: note: ...` line.
    """
    from fila_cli.cli.ask_output import failed_record_on_stdout, json_output, run_ask

    as_json = json_output(as_json)
    asked: list[str] = [question]  # the question as read (from stdin for "-"), for a failed record
    with handle_errors(verbose), failed_record_on_stdout(file, lambda: asked[-1], model, as_json):
        asked.append(_read_question(question))
        run_ask(file, asked[-1],
                model_options(model=model, llm=llm, mmproj=mmproj, fusion=fusion, device=device, dtype=dtype,
                              gpu_layers=gpu_layers, ctx_size=ctx_size, template=template, no_cache=no_cache, verbose=verbose, cache_max_gb=cache_max_gb),
                ask_options(pages=pages, password=password, text_layer=text_layer, temperature=temperature,
                            top_p=top_p, seed=seed, max_tokens=max_tokens, together=together, evidence_ocr=evidence_ocr),
                as_json=as_json, stream=not no_stream, server=server, keep_alive=keep_alive, show_evidence=show_evidence)


@app.command(epilog=EXIT_CODES_HELP)
def chat(
    file: Annotated[Path, typer.Argument(help="A PDF, or an image (PNG, JPEG, WebP, TIFF).", show_default=False)],
    pages: Annotated[str | None, typer.Option("--pages", help="Pages in the conversation, 1-based, e.g. 2 or 2,9 (several: together in one prompt). Default: page 1; /page N moves.")] = None,
    model: ModelOption = None,
    llm: LlmOption = None,
    mmproj: MmprojOption = None,
    fusion: FusionOption = None,
    password: PasswordOption = None,
    text_layer: TextLayerOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Read one question a line from stdin and print one JSON line per answer (the default when stdin is not a terminal).")] = False,
    server: ServerOption = None,
    evidence_ocr: EvidenceOcrOption = False,
    temperature: TemperatureOption = SamplingParams.temperature,
    top_p: TopPOption = SamplingParams.top_p,
    seed: SeedOption = SamplingParams.seed,
    max_tokens: MaxTokensOption = SamplingParams.max_tokens,
    ctx_size: CtxSizeOption = ModelOptions.ctx_size,
    template: TemplateOption = ModelOptions.template,
    gpu_layers: GpuLayersOption = ModelOptions.gpu_layers,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    no_cache: NoCacheOption = False,
    cache_max_gb: CacheMaxGbOption = ModelOptions.cache_max_gb,
    verbose: VerboseOption = False,
) -> None:
    """Talk with a document: the model loads once, the page is read once, follow-up questions see the conversation.

    Commands: /page N (move), /page +N (add a page), /pages, /crops [FILE.png], /clear, /save FILE.json,
    /help. Ctrl-C stops the answer in progress; Ctrl-D leaves. Piped (one question a line on stdin),
    stdout holds one JSON line per answer: the `fila ask --json` keys plus "turn", "interrupted" and
    "dropped_turns". When the context would overflow, the oldest turns are dropped (never the page).
    """
    with handle_errors(verbose):
        from fila_cli.cli.chat_output import run_chat

        raise typer.Exit(run_chat(
            file,
            model_options(model=model, llm=llm, mmproj=mmproj, fusion=fusion, device=device, dtype=dtype,
                          gpu_layers=gpu_layers, ctx_size=ctx_size, template=template, no_cache=no_cache, verbose=verbose, cache_max_gb=cache_max_gb),
            ask_options(pages=pages, password=password, text_layer=text_layer, temperature=temperature, top_p=top_p,
                        seed=seed, max_tokens=max_tokens, together=True, evidence_ocr=evidence_ocr),
            as_json=as_json, server=server))


@app.command(epilog=EXIT_CODES_HELP)
def batch(
    paths: Annotated[list[str], typer.Argument(help="Documents: files, folders (their PDFs and images) and globs.", show_default=False)],
    question: Annotated[list[str], typer.Option("--question", "-q", help="A question; repeat for several.")] = [],  # noqa: B006 (typer copies it)
    questions_file: Annotated[Path | None, typer.Option("--questions", help="A file of questions, one per line.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write JSON lines to this file (default: stdout).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUTPUT: skip the (document, question, model) records it already holds.")] = False,
    pages: Annotated[str | None, typer.Option("--pages", help="Pages to read in every document, 1-based (default: fila chooses).")] = None,
    together: Annotated[bool, typer.Option("--together", help="Read each document's --pages in one prompt, each introduced by its page number (one record per document and question, listing every page); a document whose pages the context cannot hold is a failed record (kind model), with the numbers.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds the document worker may spend on one document (opening, choosing pages, rendering, text extraction; the model's time between pages does not count) before it is recorded as a timeout.")] = DEFAULT_TIMEOUT_S,
    ray: Annotated[str | None, typer.Option("--ray", help="Run across a Ray cluster: 'auto' joins the running one (or starts a local one), 'local' starts a private one on this machine, or give its address (ray://host:10001, host:6379). Needs `pip install \"fila-cli[ray]\"`; the documents' paths must be visible on every node.", show_default=False)] = None,
    ray_cpus: Annotated[float, typer.Option("--ray-cpus", help="With --ray on CPU-only nodes: CPUs per worker (one model each). On GPU nodes each worker takes one GPU.")] = DEFAULT_RAY_CPUS,
    pipeline_depth: Annotated[int | None, typer.Option("--pipeline-depth", help=f"Pages rendered and encoded ahead while the LLM answers the current one (with --ray, in each worker; each holds one page's visual tokens in memory); 0 does one stage at a time. Default: {DEFAULT_PIPELINE_DEPTH}, or --parallel's N.", show_default=False)] = None,
    parallel: Annotated[int, typer.Option("--parallel", help="Answer up to N documents' questions side by side in one LLM context (each answer decoded in the same step). Costs N KV caches of the model's context in memory (~0.5 GB each for Mistral-7B at 4096 tokens). Meant for a GPU, where a step costs about as much for N answers as for one; on a CPU the prefill dominates and the gain is small. Records come out in the same order, with the same answers but where two candidate tokens are nearly tied (docs/batch.md).")] = 1,
    compile_encoder: CompileOption = False,
    server: ServerOption = None,
    evidence_ocr: EvidenceOcrOption = False,
    model: ModelOption = None,
    llm: LlmOption = None,
    mmproj: MmprojOption = None,
    fusion: FusionOption = None,
    password: PasswordOption = None,
    text_layer: TextLayerOption = False,
    temperature: TemperatureOption = SamplingParams.temperature,
    top_p: TopPOption = SamplingParams.top_p,
    seed: SeedOption = SamplingParams.seed,
    max_tokens: MaxTokensOption = SamplingParams.max_tokens,
    ctx_size: CtxSizeOption = ModelOptions.ctx_size,
    template: TemplateOption = ModelOptions.template,
    gpu_layers: GpuLayersOption = ModelOptions.gpu_layers,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    no_cache: NoCacheOption = False,
    cache_max_gb: CacheMaxGbOption = ModelOptions.cache_max_gb,
    verbose: VerboseOption = False,
) -> None:
    """Answer questions over many documents: one JSON record per (document, question).

    Each record has the `fila ask --json` keys plus "sha256" (of the document) and "error" (null, or
    {"kind", "message"} with kind document, model, timeout, crash, usage or error). Records are written
    and flushed one by one, so an interrupted batch loses at most the record in flight; `--resume`
    continues it. Exit 0 when every record succeeded, 1 when some failed, 130 on Ctrl-C, 143 on SIGTERM.
    """
    with handle_errors(verbose):
        from fila_cli.cli.batch_output import run_batch_command

        raise typer.Exit(run_batch_command(
            paths, questions=question, questions_file=questions_file, recursive=recursive, output=output,
            resume=resume,
            batch=BatchOptions(timeout_s=timeout, pipeline_depth=pipeline_depth, parallel=parallel, ray_address=ray,
                               ray_cpus=ray_cpus),
            server=server,
            model=model_options(model=model, llm=llm, mmproj=mmproj, fusion=fusion, device=device, dtype=dtype,
                                gpu_layers=gpu_layers, ctx_size=ctx_size, template=template, no_cache=no_cache, verbose=verbose, cache_max_gb=cache_max_gb,
                                compile_encoder=compile_encoder),
            ask=ask_options(pages=pages, password=password, text_layer=text_layer, temperature=temperature,
                            top_p=top_p, seed=seed, max_tokens=max_tokens, together=together,
                            evidence_ocr=evidence_ocr)))


@app.command(epilog=EXIT_CODES_HELP)
def sample(
    output: Annotated[Path, typer.Argument(help="Where to write the sample PDF, e.g. invoice.pdf.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Write a sample document to try fila on: a three-page invoice (two typed pages, one scanned).

    Then: fila ask invoice.pdf "What is the total due?"
    """
    with handle_errors():
        from fila_cli.documents.sample import write_sample_invoice

        path = write_sample_invoice(output, overwrite=force)
        stderr.print(f"{path}: a 3-page sample invoice (pages 1-2 typed, page 3 a scanned delivery note). "
                     f'Try: fila ask {path} "What is the total due?"', highlight=False, markup=False)


cache_app = typer.Typer(help="The caches: visual tokens (pages already encoded are not encoded again) and LLM prefix "
                             "states (pages already read are not prefilled again).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False) -> None:
    """Where the caches are, how many entries they hold, their size and the cap they share ($FILA_CACHE_DIR overrides the place)."""
    with handle_errors():
        import json

        from rich.filesize import decimal

        from fila_cli.caches.budget import BYTES_PER_GB, DEFAULT_CACHE_MAX_GB
        from fila_cli.caches.folder import CacheFolder

        info = CacheFolder().info()
        if as_json:
            print(json.dumps(info.to_json(), indent=2))
            return
        kinds = {"tokens": "pages of visual tokens", "llm-prefix": "LLM prefix states"}
        for store in info.stores:
            print(f"{store.path}: {store.entries} {kinds.get(store.name, 'entries')}, {decimal(store.bytes)}")
        print(f"total {decimal(info.bytes)} against one cap for both, --cache-max-gb (default {DEFAULT_CACHE_MAX_GB:g}, "
              f"{decimal(int(DEFAULT_CACHE_MAX_GB * BYTES_PER_GB))}): applied at each write, least recently used first")


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every cached page: visual tokens and LLM prefix states (only the files fila wrote)."""
    with handle_errors():
        from fila_cli.caches.folder import CacheFolder

        folder = CacheFolder()
        removed = folder.clear()
        print(f"{folder.root}: removed {removed.pop('tokens')} pages of visual tokens, {removed.pop('llm-prefix')} "
              f"LLM prefix states" + "".join(f", {n} files of an older cache layout" for n in removed.values() if n))


# PyMuPDF's optional add-ons, imported by ``import pymupdf`` when installed (PyMuPDF 2 installs
# both): the layout analyser loads an ONNX model at import, pymupdf4llm imports onnxruntime and
# its OCR helpers. ~0.7 s of every command's start-up, for ``Page.get_layout`` and
# ``pymupdf.to_markdown``, which fila never calls.
PYMUPDF_ADDONS_FILA_NEVER_USES = ("pymupdf.layout", "pymupdf4llm")


def _skip_pymupdf_addons() -> None:
    """A ``None`` in sys.modules makes an import fail, which PyMuPDF takes as "not installed".
    Only the ``fila`` command does this: a program importing fila_cli keeps the add-ons."""
    if "pymupdf" not in sys.modules:
        for name in PYMUPDF_ADDONS_FILA_NEVER_USES:
            sys.modules.setdefault(name, None)


def main() -> None:
    _skip_pymupdf_addons()
    app()


if __name__ == "__main__":
    main()
