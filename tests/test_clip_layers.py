"""fila's CLIP vision layers (plain torch, no transformers import at run time) against
transformers' own ``CLIPVisionEmbeddings`` and ``CLIPEncoderLayer`` with SDPA: same weights in,
bit-identical outputs out."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from transformers import CLIPVisionConfig
from transformers.models.clip import modeling_clip as hf

from fila_cli.config import ClipVisionConfig
from fila_cli.vision.model import clip_layers
from fila_cli.vision.model.cpu_attention import fused_cpu_attention

TINY = ClipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        image_size=56, patch_size=14)
N_VIEWS = 3


def _hf_config(config: ClipVisionConfig) -> CLIPVisionConfig:
    hf_config = CLIPVisionConfig(**asdict(config))
    hf_config._attn_implementation = "sdpa"
    return hf_config


def _pair(ours: torch.nn.Module, theirs: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    for parameter in theirs.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours.to(dtype).eval(), theirs.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_encoder_layer_is_transformers_bit_for_bit(dtype, hidden_act, grad):
    """Both paths: inference (in-place activation and residuals) and training (autograd's). bfloat16
    inference with SDPA, as HF runs it (its fused CPU kernel is held to HF in test_cpu_attention.py)."""
    config = ClipVisionConfig(**{**asdict(TINY), "hidden_act": hidden_act})
    ours, theirs = _pair(clip_layers.CLIPEncoderLayer(config), hf.CLIPEncoderLayer(_hf_config(config)), dtype)
    hidden = torch.randn(N_VIEWS, 17, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        expected = theirs(hidden, attention_mask=None)
        expected = expected[0] if isinstance(expected, tuple) else expected
    with torch.set_grad_enabled(grad), fused_cpu_attention(False):
        got = ours(hidden)
    assert got.requires_grad == grad
    assert torch.equal(got.detach(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embeddings_are_transformers_bit_for_bit(dtype):
    ours, theirs = _pair(clip_layers.CLIPVisionEmbeddings(TINY), hf.CLIPVisionEmbeddings(_hf_config(TINY)), dtype)
    pixels = torch.randn(N_VIEWS, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(pixels), theirs(pixels))


def test_an_unknown_activation_is_refused_by_name():
    with pytest.raises(ValueError, match="relu6"):
        clip_layers.CLIPMLP(ClipVisionConfig(hidden_act="relu6"))
