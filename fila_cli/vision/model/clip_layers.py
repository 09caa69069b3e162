"""CLIP ViT layers in plain torch: transformers' ``modeling_clip`` vision modules, op for op.

The same parameter names (``embeddings.patch_embedding.weight``, ``encoder.layers.N.self_attn.q_proj.weight``,
...) and the same operations in the same order as transformers' ``CLIPVisionEmbeddings`` and
``CLIPEncoderLayer`` with SDPA attention, so float32 outputs are bit-identical to HF's
(``tests/test_encoder_reference.py``, ``tests/test_clip_layers.py``). Written out because importing
``transformers.models.clip.modeling_clip`` loads transformers' model machinery (torch._dynamo,
torch.distributed, torchvision): seconds of start-up on every `fila ask`. bfloat16 inference on the
CPU attends through oneDNN Graph's fused kernel instead (``cpu_attention``: the same function within
bfloat16's rounding, ~3× faster there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fila_cli.config import ClipVisionConfig
from fila_cli.vision.model import cpu_attention

QUICK_GELU_SCALE = 1.702  # CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # transformers' QuickGELUActivation: CLIP's own approximation of GELU.
    if not torch.is_grad_enabled():
        # Inference: one temporary instead of two, and one pass less over the [views, tokens,
        # 4096] activations. The same roundings in the same order (a product is commutative), so
        # the result is bit-identical to the expression below.
        gate = torch.mul(x, QUICK_GELU_SCALE).sigmoid_()
        return gate.mul_(x)
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


# transformers' ACT2FN names -> the function each stands for (those a CLIP tower uses).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one a CLIP vision tower uses ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding (a strided conv, no bias), a class token, learned positions."""

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(self.embed_dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim, kernel_size=self.patch_size,
                                         stride=self.patch_size, bias=False)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, 1 + n_patches, width]."""
        batch_size, _, height, width = pixel_values.shape
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size}).")
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))  # [n, width, g, g]
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)  # [n, g*g, width]
        class_embeds = self.class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        return embeddings + self.position_embedding(self.position_ids)


class CLIPAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (no mask: a ViT sees every patch)."""

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, t, width] -> [n, t, width]."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [n, heads, t, head_dim]
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if cpu_attention.applies(queries):
            attn_output = cpu_attention.attend(queries, keys, values, self.scale)
        else:
            attn_output = F.scaled_dot_product_attention(queries, keys, values, attn_mask=None, dropout_p=0.0,
                                                         scale=self.scale, is_causal=False)
        attn_output = attn_output.transpose(1, 2).contiguous()  # [n, t, heads, head_dim]
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output)


class CLIPMLP(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.activation_fn = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, t, width] -> [n, t, width]."""
        if not torch.is_grad_enabled():
            # Inference: each branch's output is a fresh tensor, so the residual is added into it
            # in place (bit-identical: a sum is commutative) rather than into a new one.
            hidden_states = self.self_attn(self.layer_norm1(hidden_states)).add_(hidden_states)
            return self.mlp(self.layer_norm2(hidden_states)).add_(hidden_states)
        residual = hidden_states
        hidden_states = residual + self.self_attn(self.layer_norm1(hidden_states))
        residual = hidden_states
        return residual + self.mlp(self.layer_norm2(hidden_states))
