"""bfloat16 self-attention on the CPU through oneDNN Graph's fused attention kernel.

PyTorch's CPU flash-attention kernel runs CLIP ViT-L/14-336's attention (577 tokens, 64-wide heads)
at about a sixth of the bfloat16 matmul peak on the 2-core AVX512-BF16 machine, and with 24 layers
that was a third of the encoder's time. oneDNN Graph recognises q·kᵀ·scale → softmax → ·v as one
partition and runs it as one fused kernel, about 3× faster there (``benchmarks/encoder.py`` has the
rows with it on and off). PyTorch reaches oneDNN Graph only through TorchScript's fuser
(``torch.jit.enable_onednn_fusion``), so the three operations are scripted, frozen and fused once per
input layout, and called through a custom op, which ``torch.compile`` keeps whole instead of breaking
its graph.

Only bfloat16, on the CPU, without autograd: float32 stays on SDPA (bit-identical to HF's CLIP),
training keeps SDPA's backward, and GPUs have their own fused kernels. ``FILA_FUSED_CPU_ATTENTION=0``
turns it off (SDPA everywhere), for a CPU or a PyTorch build where oneDNN Graph misbehaves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_log = logging.getLogger(__name__)

ENV_SWITCH = "FILA_FUSED_CPU_ATTENTION"
OP_NAME = "fila::cpu_fused_attention"

_enabled = os.environ.get(ENV_SWITCH, "1") != "0"
# A PyTorch build without oneDNN (or whose TorchScript cannot fuse with it) keeps SDPA.
_onednn_graph_works = torch.backends.mkldnn.is_available() and hasattr(torch._C, "_jit_set_llga_enabled")
# (shape, strides, scale) -> the scripted, frozen, fused core for inputs laid out so.
_cores: dict[tuple, torch.jit.ScriptModule] = {}
_cores_lock = threading.Lock()


class _AttentionCore(nn.Module):
    """softmax(q·kᵀ·scale)·v, written as the three operations oneDNN Graph fuses."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # [n, heads, t, head_dim] x3 -> [n, heads, t, head_dim]
        scores = torch.matmul(queries, keys.transpose(-1, -2)) * self.scale  # [n, heads, t, t]
        return torch.matmul(torch.softmax(scores, dim=-1), values)


def applies(queries: torch.Tensor) -> bool:
    """Whether attention over ``queries`` goes through the fused kernel."""
    return (_enabled and queries.device.type == "cpu" and queries.dtype == torch.bfloat16 and not torch.is_grad_enabled()
            and _onednn_graph_works)


@contextlib.contextmanager
def fused_cpu_attention(enabled: bool) -> Iterator[None]:
    """Turn the fused kernel on or off inside the block (benchmarks and tests compare both)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def _warmed_core(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.jit.ScriptModule:
    """Script and freeze the core, then run it on inputs of this layout until TorchScript's
    profiling executor has fused it: every real call then goes through the same kernel (no call
    computed unfused, with other roundings, before the fused ones). Scripted, not traced: the op
    may first run inside a compiled graph, where tracing is not allowed."""
    torch.jit.enable_onednn_fusion(True)
    # Zeros with the very same strides (zeros_like would make slices of a wider buffer contiguous), so
    # that the executor profiles and fuses for the layout the real calls bring.
    example = tuple(t.new_empty_strided(t.shape, t.stride()).zero_() for t in (queries, keys, values))
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit is deprecated in favour of torch.compile, which has no path to oneDNN Graph.
        warnings.simplefilter("ignore", FutureWarning)
        core = torch.jit.freeze(torch.jit.script(_AttentionCore(scale).eval()))
        for _ in range(torch._C._jit_get_num_profiled_runs() + 1):
            core(*example)
    return core


def _fused_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    global _onednn_graph_works
    key = (tuple(queries.shape), queries.stride(), keys.stride(), values.stride(), scale)
    core = _cores.get(key)
    if core is None:
        with _cores_lock:
            core = _cores.get(key)
            if core is None:
                try:
                    core = _cores[key] = _warmed_core(queries, keys, values, scale)
                except RuntimeError as error:
                    # A build whose TorchScript cannot fuse (no oneDNN Graph compiled in): SDPA from now on.
                    _log.debug("oneDNN Graph attention unavailable (%s); using SDPA", error)
                    _onednn_graph_works = False
                    return F.scaled_dot_product_attention(queries, keys, values, scale=scale).contiguous()
    return core(queries, keys, values).contiguous()


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """[n, heads, t, head_dim] x3 -> contiguous [n, heads, t, head_dim]: softmax(q·kᵀ·scale)·v.

    Eager calls go straight to the fused core: the custom op's first call imports torch.compile's
    machinery (~900 modules, a second of a `fila ask`). Only a graph being compiled records the op.
    """
    if torch.compiler.is_compiling():
        return cpu_fused_attention(queries, keys, values, scale)
    return _fused_attention(queries, keys, values, scale)


@torch.library.custom_op(OP_NAME, mutates_args=())
def cpu_fused_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """``attend`` as an op that ``torch.compile`` keeps whole (opaque to its tracing)."""
    return _fused_attention(queries, keys, values, scale)


@cpu_fused_attention.register_fake
def _(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    return queries.new_empty(queries.shape)
