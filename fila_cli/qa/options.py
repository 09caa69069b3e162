"""What a question is asked with: the model options and the per-question options, with their defaults.

Light on purpose (no torch, no llama.cpp): the CLI reads its option defaults from here, so each
default is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fila_cli.bundles.bundle import Bundle, resolve_bundle
from fila_cli.caches.budget import DEFAULT_CACHE_MAX_GB
from fila_cli.errors import UsageError
from fila_cli.llm.sampling import SamplingParams

# ``fila batch --pipeline-depth``: pages rendered and encoded ahead while the LLM answers. One keeps
# the encoder busy meanwhile and costs one page's visual tokens of memory; 0 runs a stage at a time.
DEFAULT_PIPELINE_DEPTH = 1
# The smallest --ctx-size: llama.cpp's step of context cells (a context smaller holds no page anyway).
MIN_CTX_SIZE = 256


@dataclass
class AskOptions:
    # 1-based: the CLI's "1,3-5", or integers [1, 3, 4, 5] (kept as "1,3,4,5"); None: fila chooses.
    pages: str | Sequence[int] | None = None
    password: str | None = None
    text_layer: bool = False  # add the page's text layer to the prompt (off: the paper's model)
    together: bool = False  # several pages in one prompt, each introduced by its number
    # Locate the answer on scanned pages by OCR (Tesseract, seconds a page); off: text layers only.
    evidence_ocr: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if self.pages is not None and not isinstance(self.pages, str):
            self.pages = _page_spec(self.pages)
        if self.pages is not None:
            # A typo in --pages is a usage error now, before any model loads or any document opens.
            from fila_cli.documents.document import page_ranges

            page_ranges(self.pages)


def _page_spec(pages: Sequence[int]) -> str:
    """1-based page numbers as the page spec the documents layer reads; UsageError for anything else."""
    from fila_cli.errors import UsageError

    numbers = list(pages)
    if not numbers or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in numbers):
        raise UsageError(f"pages must be 1-based page numbers, e.g. [1, 3] (got {pages!r})")
    return ",".join(str(n) for n in numbers)


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


# ``fila batch --timeout``: seconds the document worker may spend on one document.
DEFAULT_TIMEOUT_S = 120.0
# ``fila batch --ray-cpus``: CPUs per worker on CPU-only nodes (one model each).
DEFAULT_RAY_CPUS = 2.0


@dataclass
class BatchOptions:
    """How a batch runs (``fila batch``, ``run_batch``, ``run_batch_on_ray``), checked once, here."""

    timeout_s: float = DEFAULT_TIMEOUT_S  # the document worker's budget per document
    # Pages rendered and encoded ahead of the LLM; 0: a stage at a time; None: the default, at least ``parallel``.
    pipeline_depth: int | None = None
    parallel: int = 1  # units of one prompt each answered side by side in one llama.cpp context
    ray_address: str | None = None  # run on a Ray cluster: "auto", "local" or an address
    ray_cpus: float = DEFAULT_RAY_CPUS
    ray_actors: int | None = None  # None: one per GPU of the cluster, else as many as its CPUs hold

    def __post_init__(self) -> None:
        from fila_cli.errors import UsageError

        if self.timeout_s <= 0:
            raise UsageError(f"--timeout must be positive (got {self.timeout_s:g})")
        if self.parallel < 1:
            raise UsageError(f"--parallel must be at least 1 (got {self.parallel})")
        if self.pipeline_depth is not None and self.pipeline_depth < 0:
            raise UsageError(f"--pipeline-depth must be 0 (no overlap) or more (got {self.pipeline_depth})")
        if self.pipeline_depth is not None and 0 < self.pipeline_depth < self.parallel:
            raise UsageError(f"--pipeline-depth {self.pipeline_depth} is less than --parallel {self.parallel}: at most "
                             f"{self.pipeline_depth + 1} pages would ever be ready together; pass --pipeline-depth "
                             f"{self.parallel} or more (or 0, to prepare each group's pages in turn)")
        if self.ray_address is not None and self.parallel > 1:
            raise UsageError("--parallel is for one machine's batch; with --ray each worker answers one document at a time")
        if self.ray_address is not None and self.ray_cpus <= 0:
            raise UsageError(f"--ray-cpus must be positive (got {self.ray_cpus:g})")

    @property
    def depth(self) -> int:
        """The pipeline depth in effect: the one given, else the default raised to ``parallel``."""
        if self.pipeline_depth is None:
            return max(DEFAULT_PIPELINE_DEPTH, self.parallel)
        return self.pipeline_depth
