"""The options that ask and batch share, and the one place that turns them into library options.

Defaults come from the library's dataclasses (``ModelOptions``, ``SamplingParams``), so the help,
the CLI and a Python caller agree on each of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fila_cli.caches.budget import DEFAULT_CACHE_MAX_GB
from fila_cli.cli.support import stderr
from fila_cli.llm.sampling import SamplingParams
from fila_cli.llm.templates import FAMILIES
from fila_cli.qa.options import AskOptions, ModelOptions

DeviceOption = Annotated[str, typer.Option("--device", help="Where the vision encoder runs: auto (best present), cpu, cuda or mps.")]
CompileOption = Annotated[bool, typer.Option("--compile", help="Compile the vision encoder with torch.compile: faster pages after about a minute of compiling per page shape (2-core CPU, ViT-L); for long runs.")]
DtypeOption = Annotated[
    str, typer.Option("--dtype", help="Vision encoder precision: auto, float32, bfloat16. auto: bfloat16 on CUDA GPUs that support it "
                                      "(float16 on older ones) and on CPUs with AMX/AVX512-BF16, float16 on Apple MPS, float32 on other "
                                      "CPUs; the choice is printed on stderr.")
]
PASSWORD_ENV = "FILA_PASSWORD"


def _password(value: str | None) -> str | None:
    """``--password -``: asked for without echo on a terminal, else the first line of stdin (a file:
    ``--password - < secret.txt``). $FILA_PASSWORD or ``-`` keep it out of ``ps`` and shell history."""
    if value != "-":
        return value
    import getpass
    import sys

    from fila_cli.errors import UsageError

    if sys.stdin.isatty():
        return getpass.getpass("PDF password: ")
    line = sys.stdin.readline()
    if not line:
        raise UsageError("--password -: stdin is empty; pipe the password in, or set $FILA_PASSWORD")
    return line.rstrip("\r\n")


PasswordOption = Annotated[str | None, typer.Option(
    "--password", envvar=PASSWORD_ENV, callback=_password, show_envvar=True,
    help="Password of an encrypted PDF. Safer than in the command line (seen in `ps` and the shell's history): "
         "$FILA_PASSWORD, or `-` to be asked (on a terminal) or to read it from stdin (`--password - < FILE`).")]
ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Model bundle: a known name (see `fila weights list`) or a directory. Default: $FILA_MODEL or llava-1.6-mistral-7b.")]
LlmOption = Annotated[Path | None, typer.Option("--llm", help="LLM GGUF file (explicit form, with --mmproj).")]
MmprojOption = Annotated[Path | None, typer.Option("--mmproj", help="Vision weights: mmproj GGUF or LLaVA-NeXT safetensors (explicit form, with --llm).")]
FusionOption = Annotated[Path | None, typer.Option("--fusion", help="FILA fusion weights (.safetensors + .json). Without them fusion is off.")]
TextLayerOption = Annotated[bool, typer.Option("--text-layer", help="Add the page's text layer to the prompt (off by default: the paper's model reads pixels only).")]
TemperatureOption = Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy (deterministic).")]
TopPOption = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (with --temperature > 0).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed for sampling.")]
MaxTokensOption = Annotated[int, typer.Option("--max-tokens", help="Most tokens to generate per answer.")]
EvidenceOcrOption = Annotated[bool, typer.Option("--evidence-ocr", help="Locate the answer on scanned pages by OCR (Tesseract, seconds a page); without it the evidence of a page without a text layer is [] with its reason.")]
NoCacheOption = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the caches: visual tokens and LLM prefix states (see `fila cache`).")]
CacheMaxGbOption = Annotated[float, typer.Option("--cache-max-gb", help="Size cap of fila's cache on disk, in GB: visual tokens and LLM prefix states together; the least recently used entries go first.")]
ServerOption = Annotated[str | None, typer.Option("--server", envvar="FILA_SERVER", help="Ask a running `fila serve` (http://HOST:PORT or unix:/path.sock; $FILA_SERVER) instead of loading the model here; the output is the same.", show_default=False)]
CtxSizeOption = Annotated[int | None, typer.Option("--ctx-size", "-c", help="The LLM's context in tokens, fixed (llama.cpp's -c). Default: the bundle's n_ctx, grown as a prompt needs up to what the model was trained on and what memory allows (said on stderr).")]
TemplateOption = Annotated[str | None, typer.Option("--template", metavar="NAME|FILE.jinja", help=f"The LLM's prompt format: {', '.join(FAMILIES)}, or a jinja chat template file. Default: the bundle's, else the GGUF's chat template, else guessed from the model name (said on stderr).")]
GpuLayersOption = Annotated[int | None, typer.Option("--gpu-layers", help="LLM layers on the GPU (default: all when llama.cpp was built with CUDA or Metal, else 0).")]


def model_options(*, model: str | None, llm: Path | None, mmproj: Path | None, fusion: Path | None, device: str,
                  dtype: str, gpu_layers: int | None, no_cache: bool, verbose: bool,
                  cache_max_gb: float = DEFAULT_CACHE_MAX_GB, compile_encoder: bool = False,
                  ctx_size: int | None = None, template: str | None = None) -> ModelOptions:
    from fila_cli.errors import UsageError

    if not cache_max_gb > 0:
        raise UsageError(f"--cache-max-gb must be positive (got {cache_max_gb:g}); use --no-cache to turn the caches off")
    return ModelOptions(model=model, llm=llm, mmproj=mmproj, fusion=fusion, device=device, dtype=dtype,
                        gpu_layers=gpu_layers, use_cache=not no_cache, verbose=verbose, cache_max_gb=cache_max_gb,
                        compile_encoder=compile_encoder, ctx_size=ctx_size, template=template)


def ask_options(*, pages: str | None, password: str | None, text_layer: bool, temperature: float, top_p: float,
                seed: int, max_tokens: int, together: bool = False, evidence_ocr: bool = False) -> AskOptions:
    sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens)
    return AskOptions(pages=pages, password=password, text_layer=text_layer, sampling=sampling, together=together,
                      evidence_ocr=evidence_ocr)


def load_asker(options: ModelOptions, *, reuse_prefix: bool = False, n_seq_max: int = 1):
    """The model, loaded once, with a spinner on stderr naming it (``n_seq_max``: questions it may
    answer side by side, ``fila batch --parallel``)."""
    from fila_cli.llm.templates import template_note
    from fila_cli.qa.ask import Asker

    bundle = options.bundle()
    with stderr.status(f"loading {bundle.name}…"):
        asker = Asker.from_options(options, bundle, reuse_prefix=reuse_prefix, n_seq_max=n_seq_max)
    # What auto chose, said once: the vision encoder's device and precision, the LLM's context.
    encoder, backend = asker.encoder, asker.backend
    stderr.print(f"{bundle.name}: vision encoder on {encoder.device.type}/{str(encoder.dtype).removeprefix('torch.')}, "
                 f"{backend.context_summary}", highlight=False)
    if backend.context_note is not None:
        stderr.print(backend.context_note, highlight=False)
    if (note := template_note(asker.template)) is not None:
        stderr.print(note, highlight=False)
    backend.on_context_note = lambda line: stderr.print(line, highlight=False)  # when a prompt grows the context
    return asker
