"""How large the LLM's context may grow: the model's trained context, and what memory allows.

The context starts at the bundle's ``n_ctx`` (or the user's ``--ctx-size``, which then stays
fixed) and grows, when a prompt needs more, to what the prompt and its answer need, up to the
smaller of

- the context the model was trained on (GGUF ``<arch>.context_length``): past it a model's
  positions are out of distribution;
- what memory allows: the KV cache costs ``kv_bytes_per_token`` a position (a K and a V vector per
  layer and KV head, f16), and it may take ``MEMORY_SAFETY_FRACTION`` of the memory available now
  (the GPU's when the layers are offloaded, else RAM), beside the cache it already holds.

Pure arithmetic and reads of the OS: no llama.cpp here (the backend measures the model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from fila_cli.errors import ModelError

# llama.cpp's default KV cache type is f16: 2 bytes a value.
KV_BYTES_PER_VALUE = 2
# Share of the memory available now that a larger KV cache may take: the rest is left for the
# compute buffers (which grow with the context too), the vision encoder and everything else.
MEMORY_SAFETY_FRACTION = 0.5
# llama.cpp pads its context to a multiple of 256 cells: grow in those steps.
CONTEXT_STEP = 256
BYTES_PER_KIB = 1024
BYTES_PER_GIB = 1024**3

LimitKind = Literal["trained", "memory", "fixed", "unknown"]


class ContextOverflowError(ModelError):
    """The prompt (text + visual tokens) does not fit in the model's context: a limit of the model
    or of the machine (exit 4), not a bad option."""

    def __init__(self, message: str, *, n_needed: int, n_ctx: int):
        super().__init__(message)
        self.n_needed = n_needed
        self.n_ctx = n_ctx


@dataclass(frozen=True)
class KVShape:
    """What one position of the KV cache holds, from the model's hyper-parameters."""

    n_layer: int
    n_head_kv: int
    key_length: int  # per head
    value_length: int

    @property
    def bytes_per_token(self) -> int:
        return self.n_layer * self.n_head_kv * (self.key_length + self.value_length) * KV_BYTES_PER_VALUE


def kv_shape(*, n_layer: int, n_head: int, n_head_kv: int, n_embd: int, metadata: dict[str, str],
             architecture: str) -> KVShape:
    """The KV shape; head dimensions from GGUF ``<arch>.attention.key_length``/``value_length``
    when the model states them (Gemma's differ from n_embd / n_head), else n_embd / n_head."""
    head_dim = n_embd // max(n_head, 1)
    key_length = int(metadata.get(f"{architecture}.attention.key_length") or head_dim)
    value_length = int(metadata.get(f"{architecture}.attention.value_length") or head_dim)
    return KVShape(n_layer, n_head_kv or n_head, key_length, value_length)


@dataclass(frozen=True)
class Memory:
    """Bytes available now, and where."""

    available: int
    where: str  # "RAM" or "GPU memory"


def available_memory(on_gpu: bool) -> Memory | None:
    """The memory a larger KV cache would come out of; None when the OS does not say."""
    if on_gpu:
        gpu = _gpu_memory()
        if gpu is not None:
            return gpu
    return _ram()


def _gpu_memory() -> Memory | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None  # Metal shares RAM with the CPU: RAM is the limit
    free, _total = torch.cuda.mem_get_info()
    return Memory(int(free), "GPU memory")


def _ram() -> Memory | None:
    try:  # Linux: what can be had without swapping (page cache included)
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return Memory(int(line.split()[1]) * BYTES_PER_KIB, "RAM")
    except OSError:
        pass
    try:
        return Memory(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class ContextLimit:
    """The most positions one prompt and its answer may fill, and what sets it."""

    n_ctx: int
    kind: LimitKind
    model_name: str
    n_ctx_train: int | None = None
    memory: Memory | None = None
    bytes_per_token: int = 0

    def why(self) -> str:
        """What sets the limit, for a growing context: 'what M was trained on', 'what memory allows (…)'."""
        if self.kind == "memory":
            assert self.memory is not None
            return (f"what memory allows ({_size(self.bytes_per_token)} of KV cache a token, "
                    f"{self.memory.available / BYTES_PER_GIB:.1f} GiB of {self.memory.where} available)")
        return f"what {self.model_name} was trained on"

    def describe(self) -> str:
        """'the context holds … tokens: <why>', for refusals."""
        if self.kind in ("trained", "memory"):
            return f"the context holds at most {self.n_ctx} tokens, {self.why()}"
        if self.kind == "fixed":
            return f"the context holds {self.n_ctx} tokens (--ctx-size)"
        return (f"the context holds {self.n_ctx} tokens (the bundle's n_ctx: {self.model_name}'s GGUF does not say "
                "what context it was trained on)")

    def advice(self) -> str:
        """What would make a larger prompt fit."""
        if self.kind == "memory":
            return "free memory (or offload fewer layers with --gpu-layers), or read fewer or smaller pages (--pages)"
        if self.kind == "fixed":
            most = f" up to {self.n_ctx_train}, what the model was trained on," if self.n_ctx_train else ""
            return f"raise --ctx-size{most} or leave it out to let fila size the context, or read fewer pages (--pages)"
        if self.kind == "unknown":
            return "set a larger context with --ctx-size if the model was trained for one, or read fewer pages (--pages)"
        return "use a model trained on a longer context, or read fewer or smaller pages (--pages)"


def _size(n_bytes: int) -> str:
    return f"{n_bytes} bytes" if n_bytes < BYTES_PER_KIB else f"{n_bytes / BYTES_PER_KIB:g} KiB"


def memory_limit(n_ctx: int, n_seq: int, bytes_per_token: int, memory: Memory | None) -> int | None:
    """The per-sequence context memory allows: the cache held now (freed when the context is made
    again) plus the safe share of what is available, over ``n_seq`` sequences; None if unknown."""
    if memory is None or bytes_per_token <= 0:
        return None
    budget = n_ctx * n_seq * bytes_per_token + memory.available * MEMORY_SAFETY_FRACTION
    return int(budget // (n_seq * bytes_per_token)) // CONTEXT_STEP * CONTEXT_STEP


def grown_size(n_needed: int, room: int, limit: int) -> int:
    """The context to grow to for a prompt of ``n_needed`` positions: with ``room`` for its answer,
    in llama.cpp's steps, never past ``limit``."""
    wanted = -(-(n_needed + room) // CONTEXT_STEP) * CONTEXT_STEP
    return max(n_needed, min(wanted, limit))
