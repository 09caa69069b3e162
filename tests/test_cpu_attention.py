"""bfloat16 attention on the CPU through oneDNN Graph (``cpu_attention``) against SDPA and HF's CLIP:
the same function within bfloat16's rounding, really fused, the same tokens call after call, and
used only where it should be (bfloat16, CPU, no autograd, not switched off)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from transformers.models.clip import modeling_clip as hf

from fila_cli.config import ClipVisionConfig
from fila_cli.vision.model import clip_layers, cpu_attention
from fila_cli.vision.model.cpu_attention import fused_cpu_attention
from tests.test_clip_layers import TINY, _hf_config, _pair

# bfloat16 keeps 8 bits of mantissa: ~4e-3 relative per rounding; a few roundings in a row.
BF16_RELATIVE_ERROR = 2e-2


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def heads(n: int, tokens: int, n_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    """[n, heads, t, head_dim] laid out as CLIPAttention makes them: a transposed view of [n, t, heads, head_dim]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, tokens, n_heads, head_dim, generator=generator).to(torch.bfloat16).transpose(1, 2)


def packed_heads(n: int, tokens: int, n_heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as slices of one [n, t, 3, heads, head_dim] buffer (a fused qkv projection's layout):
    strided views with gaps, which a contiguous copy would not reproduce."""
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randn(n, tokens, 3, n_heads, head_dim, generator=generator).to(torch.bfloat16)
    return tuple(packed[:, :, i].transpose(1, 2) for i in range(3))


@pytest.mark.parametrize("shape", [(3, 17, 4, 16), (5, 50, 16, 64)], ids=["tiny", "wide-heads"])
@pytest.mark.parametrize("layout", ["transposed", "packed-qkv"])
def test_fused_attention_is_sdpa_within_bfloat16_rounding_and_really_fused(shape, layout):
    if layout == "packed-qkv":
        queries, keys, values = packed_heads(*shape, seed=7)
    else:
        queries, keys, values = (heads(*shape, seed=seed) for seed in range(3))
    scale = shape[-1] ** -0.5
    with torch.inference_mode():
        got = cpu_attention.attend(queries, keys, values, scale)
        graph = str(torch.jit.last_executed_optimized_graph())
        exact = F.scaled_dot_product_attention(queries.float(), keys.float(), values.float(), scale=scale)
        sdpa = F.scaled_dot_product_attention(queries, keys, values, scale=scale)
    assert "prim::oneDNNFusionGroup" in graph  # oneDNN Graph ran it, not TorchScript's unfused ops
    assert got.shape == exact.shape and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert relative_error(got, exact) <= 2 * relative_error(sdpa, exact) + 1e-3


@pytest.mark.parametrize("layout", ["transposed", "packed-qkv"])
def test_the_first_call_of_a_new_layout_gives_the_later_calls_tokens(layout):
    # A layout never seen before: the first call scripts and warms the core, and must already be fused.
    if layout == "packed-qkv":
        queries, keys, values = packed_heads(2, 23, 4, 16, seed=5)
    else:
        queries, keys, values = (heads(2, 23, 4, 16, seed=seed) for seed in range(3))
    with torch.inference_mode():
        calls = [cpu_attention.attend(queries, keys, values, 0.25) for _ in range(4)]
    assert all(torch.equal(calls[0], later) for later in calls[1:])


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_bfloat16_encoder_layer_with_fused_attention_is_transformers_within_rounding(hidden_act):
    config = ClipVisionConfig(**{**asdict(TINY), "hidden_act": hidden_act})
    ours, theirs = _pair(clip_layers.CLIPEncoderLayer(config), hf.CLIPEncoderLayer(_hf_config(config)), torch.bfloat16)
    exact = hf.CLIPEncoderLayer(_hf_config(config)).eval()
    exact.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
    hidden = torch.randn(3, 17, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = exact(hidden, attention_mask=None)
        expected = expected[0] if isinstance(expected, tuple) else expected
        hf_bf16 = theirs(hidden.bfloat16(), attention_mask=None)
        hf_bf16 = hf_bf16[0] if isinstance(hf_bf16, tuple) else hf_bf16
        assert cpu_attention.applies(torch.empty(1, dtype=torch.bfloat16))
        got = ours(hidden.bfloat16())
    assert not torch.equal(got, hf_bf16)  # the fused kernel really was the one used
    assert relative_error(got, expected) <= max(2 * relative_error(hf_bf16, expected), BF16_RELATIVE_ERROR / 4)


@pytest.mark.parametrize("case", ["float32", "autograd", "switched-off", "meta-device"])
def test_sdpa_keeps_everything_else(case):
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    device = "meta" if case == "meta-device" else "cpu"
    queries = torch.empty(1, 1, 4, 8, dtype=dtype, device=device)
    with torch.set_grad_enabled(case == "autograd"), fused_cpu_attention(case != "switched-off"):
        assert not cpu_attention.applies(queries)
    with torch.no_grad():
        assert cpu_attention.applies(torch.empty(1, 1, 4, 8, dtype=torch.bfloat16))


def test_the_environment_switch_turns_it_off():
    probe = "import torch; from fila_cli.vision.model import cpu_attention as c; print(c.applies(torch.empty(1, dtype=torch.bfloat16)))"
    for value, expected in (("0", "False"), ("1", "True")):
        completed = subprocess.run([sys.executable, "-c", f"import torch; torch.set_grad_enabled(False); {probe}"],
                                   env={**os.environ, cpu_attention.ENV_SWITCH: value}, capture_output=True, text=True,
                                   check=True)
        assert completed.stdout.strip() == expected


def test_eager_attention_loads_no_compiler():
    """The custom op is for compiled graphs: its first call imports torch.compile's machinery (~900
    modules, a second of every `fila ask`), so eager calls must not go through it."""
    probe = ("import sys, torch; from fila_cli.vision.model import cpu_attention as c; "
             "q = torch.randn(1, 5, 2, 8).bfloat16().transpose(1, 2); "
             "torch.set_grad_enabled(False); assert c.applies(q); c.attend(q, q, q, 0.35); "
             "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert completed.stdout.split() == ["False", "False"]


def test_a_torch_that_cannot_fuse_falls_back_to_sdpa(monkeypatch):
    def no_onednn_graph(enabled):
        raise RuntimeError("oneDNN Graph is not compiled in")

    monkeypatch.setattr(torch.jit, "enable_onednn_fusion", no_onednn_graph)
    monkeypatch.setattr(cpu_attention, "_cores", {})
    monkeypatch.setattr(cpu_attention, "_onednn_graph_works", True)
    queries, keys, values = (heads(2, 9, 2, 8, seed=seed) for seed in range(3))
    with torch.inference_mode():
        got = cpu_attention.attend(queries, keys, values, 0.3)
        assert torch.equal(got, F.scaled_dot_product_attention(queries, keys, values, scale=0.3))
        assert not cpu_attention.applies(queries)  # and SDPA from then on
