"""What a question is asked with: the model options and the per-question options, with their defaults.

Light on purpose (no torch, no llama.cpp): the CLI reads its option defaults from here, so each
default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fila_cli.bundles.bundle import Bundle, resolve_bundle
from fila_cli.disk_cache import DEFAULT_CACHE_MAX_GB
from fila_cli.errors import UsageError
from fila_cli.llm.sampling import SamplingParams

# ``fila batch --pipeline-depth``: pages rendered and encoded ahead while the LLM answers. One keeps
# the encoder busy meanwhile and costs one page's visual tokens of memory; 0 runs a stage at a time.
DEFAULT_PIPELINE_DEPTH = 1
# The smallest --ctx-size: llama.cpp's step of context cells (a context smaller holds no page anyway).
MIN_CTX_SIZE = 256


@dataclass
class AskOptions:
    pages: str | None = None  # "1,3-5", 1-based; None: fila chooses
    password: str | None = None
    text_layer: bool = False  # add the page's text layer to the prompt (off: the paper's model)
    together: bool = False  # several pages in one prompt, each introduced by its number
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if self.pages is not None:
            # A typo in --pages is a usage error now, before any model loads or any document opens.
            from fila_cli.documents.document import page_ranges

            page_ranges(self.pages)


@dataclass
class ModelOptions:
    """Which model to load and where it runs: what every command that answers questions shares."""

    model: str | None = None  # a bundle name or directory; None: $FILA_MODEL or the default
    llm: Path | None = None  # explicit files, on top of (or instead of) the bundle's
    mmproj: Path | None = None
    fusion: Path | None = None
    device: str = "auto"  # the vision encoder's: auto, cpu, cuda, mps
    dtype: str = "auto"  # the vision encoder's: auto, float32, bfloat16, float16
    gpu_layers: int | None = None  # LLM layers on the GPU; None: all when llama.cpp can offload
    use_cache: bool = True  # the visual-token cache and the LLM prefix states on disk
    cache_max_gb: float = DEFAULT_CACHE_MAX_GB  # one size cap over both caches (least recently used go first)
    verbose: bool = False  # llama.cpp's own log
    compile_encoder: bool = False  # torch.compile the vision encoder (vision.model.compiled): for long batches
    # The LLM's context in tokens, fixed (llama.cpp's -c/--ctx-size); None: the bundle's n_ctx, grown
    # as prompts need up to the model's trained context and what memory allows (llm.context_size).
    ctx_size: int | None = None
    # The prompt format: a family name (llm.templates.FAMILIES) or a jinja chat template file; None:
    # the bundle's, else the GGUF's chat template, else guessed from the model name (and said so).
    template: str | None = None

    def __post_init__(self) -> None:
        # Usage errors now, before any model loads.
        if self.ctx_size is not None and self.ctx_size < MIN_CTX_SIZE:
            raise UsageError(f"--ctx-size must be at least {MIN_CTX_SIZE} tokens (got {self.ctx_size}); "
                             "leave it out to let fila size the context")
        if self.template is not None:
            from fila_cli.llm.templates import check_template_choice

            check_template_choice(self.template)

    def bundle(self) -> Bundle:
        return resolve_bundle(self.model, llm=self.llm, mmproj=self.mmproj, fusion=self.fusion)
