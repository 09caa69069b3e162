"""The options ask, chat, batch and eval share (``model_command``), and the one place that turns them into library options.

Defaults come from the library's dataclasses (``ModelOptions``, ``SamplingParams``), so the help,
the CLI and a Python caller agree on each of them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from fila_cli.cli.support import VerboseOption, stderr
from fila_cli.llm.sampling import SamplingParams
from fila_cli.llm.templates import FAMILIES
from fila_cli.qa.options import AskOptions, ModelOptions

DeviceOption = Annotated[str, typer.Option("--device", help="Where the vision encoder runs: auto (best present), cpu, cuda or mps.")]
CompileOption = Annotated[bool, typer.Option("--compile", help="Compile the vision encoder with torch.compile: faster pages after about a minute of compiling per page shape (2-core CPU, ViT-L); for long runs.")]
DtypeOption = Annotated[
    str, typer.Option("--dtype", help="Vision encoder precision: auto, float32, bfloat16, float16. auto: bfloat16 on CUDA GPUs that support it "
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
VisionMmprojOption = Annotated[Path | None, typer.Option("--mmproj", help="Vision weights: mmproj GGUF or LLaVA-NeXT safetensors (instead of the bundle's).", show_default=False)]
FusionOption = Annotated[Path | None, typer.Option("--fusion", help="FILA fusion weights (.safetensors + .json). Without them fusion is off.")]
TextLayerOption = Annotated[bool, typer.Option("--text-layer", help="Add the page's text layer to the prompt (off by default: the paper's model reads pixels only).")]
TemperatureOption = Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy (deterministic).")]
TopPOption = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (with --temperature > 0).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed for sampling.")]
MaxTokensOption = Annotated[int, typer.Option("--max-tokens", help="Most tokens to generate per answer.")]
EvidenceOcrOption = Annotated[bool, typer.Option("--evidence-ocr", help="Locate the answer on scanned pages by OCR (Tesseract, seconds a page); without it the evidence of a page without a text layer is [] with its reason.")]
CacheMaxGbOption = Annotated[float, typer.Option("--cache-max-gb", help="Size cap of fila's cache on disk, in GB: visual tokens and LLM prefix states together; the least recently used entries go first.")]
ServerOption = Annotated[str | None, typer.Option("--server", envvar="FILA_SERVER", metavar="URL", help="Ask a running `fila serve` (http://HOST:PORT or unix:/path.sock; $FILA_SERVER) instead of loading the model here; the output is the same.", show_default=False)]
CtxSizeOption = Annotated[int | None, typer.Option("--ctx-size", "-c", help="The LLM's context in tokens, fixed (llama.cpp's -c). Default: the bundle's n_ctx, grown as a prompt needs up to what the model was trained on and what memory allows (said on stderr).")]
TemplateOption = Annotated[str | None, typer.Option("--template", metavar="NAME|FILE.jinja", help=f"The LLM's prompt format: {', '.join(FAMILIES)}, or a jinja chat template file. Default: the bundle's, else the GGUF's chat template, else guessed from the model name (said on stderr).")]
GpuLayersOption = Annotated[int | None, typer.Option("--gpu-layers", help="LLM layers on the GPU (default: all when llama.cpp was built with CUDA or Metal, else 0).")]


@dataclass(frozen=True)
class SharedOption:
    """One option several commands take: its parameter name, typer annotation and default."""

    name: str
    annotation: Any
    default: Any


def _cache_option(default_on: bool) -> SharedOption:
    """``--cache/--no-cache`` on every command: one spelling, each command its own default (eval's is
    off: a benchmark's pages are read once each)."""
    help_text = ("Read and write the caches: visual tokens and LLM prefix states (see `fila cache`)." if default_on else
                 "Also keep every page's visual tokens in the on-disk cache (`fila cache`); off by default, as a split's "
                 "pages take tens of GB there. Recent pages are always reused from memory.")
    return SharedOption("cache", Annotated[bool, typer.Option("--cache/--no-cache", help=help_text)], default_on)


def _option_group(*, document: bool, compile_option: bool, cache_default: bool, max_tokens: int) -> list[SharedOption]:
    """The options of a command that loads the model and answers, in the order --help lists them."""
    group = [SharedOption("model", ModelOption, None), SharedOption("llm", LlmOption, None),
             SharedOption("mmproj", MmprojOption, None), SharedOption("fusion", FusionOption, None)]
    if document:
        group += [SharedOption("password", PasswordOption, None), SharedOption("text_layer", TextLayerOption, False),
                  SharedOption("evidence_ocr", EvidenceOcrOption, False)]
    group += [SharedOption("temperature", TemperatureOption, SamplingParams.temperature),
              SharedOption("top_p", TopPOption, SamplingParams.top_p),
              SharedOption("seed", SeedOption, SamplingParams.seed),
              SharedOption("max_tokens", MaxTokensOption, max_tokens),
              SharedOption("ctx_size", CtxSizeOption, ModelOptions.ctx_size),
              SharedOption("template", TemplateOption, ModelOptions.template),
              SharedOption("gpu_layers", GpuLayersOption, ModelOptions.gpu_layers),
              SharedOption("device", DeviceOption, "auto"), SharedOption("dtype", DtypeOption, "auto")]
    if compile_option:
        group.append(SharedOption("compile_encoder", CompileOption, False))
    group += [_cache_option(cache_default), SharedOption("cache_max_gb", CacheMaxGbOption, ModelOptions.cache_max_gb),
              SharedOption("verbose", VerboseOption, False)]
    return group


@dataclass(frozen=True)
class CommandOptions:
    """What ask, chat, batch and eval share, as typed on the command line; turned into the
    library's options (and checked) inside the command, under its error handling."""

    values: dict[str, Any]

    @property
    def verbose(self) -> bool:
        return self.values["verbose"]

    @property
    def password(self) -> str | None:
        return self.values.get("password")

    def model(self) -> ModelOptions:
        from fila_cli.errors import UsageError

        v = self.values
        if not v["cache_max_gb"] > 0:
            raise UsageError(f"--cache-max-gb must be positive (got {v['cache_max_gb']:g}); use --no-cache to turn the caches off")
        return ModelOptions(model=v["model"], llm=v["llm"], mmproj=v["mmproj"], fusion=v["fusion"], device=v["device"],
                            dtype=v["dtype"], gpu_layers=v["gpu_layers"], use_cache=v["cache"],
                            verbose=v["verbose"], cache_max_gb=v["cache_max_gb"],
                            compile_encoder=v.get("compile_encoder", False), ctx_size=v["ctx_size"], template=v["template"])

    def sampling(self) -> SamplingParams:
        v = self.values
        return SamplingParams(temperature=v["temperature"], top_p=v["top_p"], seed=v["seed"], max_tokens=v["max_tokens"])

    def ask(self, *, pages: str | None = None, together: bool = False) -> AskOptions:
        return AskOptions(pages=pages, password=self.password, text_layer=self.values.get("text_layer", False),
                          sampling=self.sampling(), together=together,
                          evidence_ocr=self.values.get("evidence_ocr", False))


def model_command(*, document: bool = True, compile_option: bool = False, cache_default: bool = True,
                  max_tokens: int = SamplingParams.max_tokens) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options of every command that loads the model and answers.

    The command declares its own arguments and options, and one parameter ``options: CommandOptions``;
    the shared options are added after its own in its signature (what typer reads), and collected
    into ``options`` when it runs.
    """
    group = _option_group(document=document, compile_option=compile_option, cache_default=cache_default,
                          max_tokens=max_tokens)
    names = [option.name for option in group]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]
        shared = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation, default=o.default)
                  for o in group]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, options=CommandOptions(values))

        run.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in (*own, *shared)}
        del run.__wrapped__  # typer reads the signature above, not the command's
        return run

    return decorate


def vision_weights(model: str | None, mmproj: Path | None, fusion: Path | None) -> tuple[Path, Path | None]:
    """The vision and fusion weights a command that runs no LLM uses: --mmproj [--fusion] as given,
    else the training run's or the bundle's; the LLM is neither needed nor looked for."""
    if mmproj is not None:
        return mmproj, fusion
    from fila_cli.bundles.bundle import BUNDLE_FILE, resolve_bundle
    from fila_cli.train.config import CONFIG_FILE

    run = Path(model).expanduser() if model is not None else None
    if run is not None and run.is_dir() and not (run / BUNDLE_FILE).exists() and (run / CONFIG_FILE).is_file():
        return _training_run_weights(run, fusion)
    bundle = resolve_bundle(model, fusion=fusion)
    return bundle.vision, bundle.fusion


def _training_run_weights(run: Path, fusion: Path | None) -> tuple[Path, Path | None]:
    """A `fila train` run exported without --llm-gguf has no bundle.json: its vision weights are the
    base checkpoint it trained from, its fusion weights the run's own."""
    import json

    from fila_cli.bundles.bundle import FUSION_STEM, SAFETENSORS_SUFFIX
    from fila_cli.errors import ModelError
    from fila_cli.train.config import CONFIG_FILE

    try:
        base = Path(json.loads((run / CONFIG_FILE).read_text())["base"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{run / CONFIG_FILE}: unreadable training settings ({error}); pass --mmproj") from None
    if not base.exists():
        raise ModelError(f"{run}: its base checkpoint {base} is gone; pass --mmproj")
    own = run / (FUSION_STEM + SAFETENSORS_SUFFIX)
    return base, fusion if fusion is not None else (own if own.is_file() else None)


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
