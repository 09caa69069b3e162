"""The memory a training step needs, estimated before training (``fila train --dry-run``).

Weights, gradients and AdamW's moments follow from the parameter counts. Activations, what autograd
keeps between the forward and the backward pass, follow from the shapes of the two transformers and
the length of the sequences; this module counts them per layer and per token, as Korthikanti et
al. ("Reducing Activation Recomputation in Large Transformer Models", 2022) do, for the layers fila
runs: torch's scaled-dot-product attention (flash / memory-efficient kernels: no seq x seq
probabilities are kept), no dropout.

Tensors kept per token by one layer, in elements (h = width, kv = key/value width, i = MLP width):

- LLM decoder layer (llama / mistral / qwen2, SwiGLU MLP): input RMSNorm's input (h), its output
  read by q/k/v (h), attention's q (h), k and v (2 kv) and output (h, also o_proj's input), post
  RMSNorm's input (h) and output (h, read by gate/up), gate and up outputs (2 i), silu(gate) (i),
  silu(gate) * up (i, down_proj's input): 6 h + 2 kv + 4 i.
- CLIP ViT layer (fc1 -> quick_gelu -> fc2): two LayerNorms' inputs and outputs (4 h), attention's
  q, k, v and output (4 h), fc1's output (i) and quick_gelu's sigmoid (i), fc2's input (i): 8 h + 3 i.

With gradient checkpointing a layer keeps only its input (h per token) and recomputes the rest in
the backward pass, one layer at a time: L x h, plus one layer's full set while it is recomputed.

The loss adds the logits: [tokens, vocab] in the compute dtype, their fp32 copy for the
cross-entropy, and its fp32 log-softmax.

Only the ViT layers after the first CVFM interaction carry gradients (the earlier ones are frozen
and see no trainable input), so only those keep activations. Not counted: the ConvNeXt branch's
stage maps that CVFM reads (small next to the LLM's at full size), embeddings, the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# fp32 gradients and AdamW's two fp32 moments per trainable parameter.
OPTIMIZER_BYTES_PER_TRAINABLE = 3 * 4
_FP32_BYTES = 4
# Elements kept per token by one layer (see the module docstring): multipliers of h, kv and i.
_DECODER_PER_WIDTH, _DECODER_PER_KV, _DECODER_PER_MLP = 6, 2, 4
_VIT_PER_WIDTH, _VIT_PER_MLP = 8, 3
# A checkpointed layer keeps only its input: one h per token.
_CHECKPOINTED_PER_WIDTH = 1
# The loss's fp32 copies of the logits: the upcast logits and the log-softmax.
_LOSS_FP32_COPIES = 2


@dataclass(frozen=True)
class TransformerShape:
    layers: int  # layers that keep activations
    width: int  # h
    mlp_width: int  # i
    kv_width: int  # key/value width (h with multi-head attention, less with grouped queries)
    gated_mlp: bool  # SwiGLU (LLM decoder) rather than fc1 -> activation -> fc2 (CLIP)

    def elements_per_token(self, checkpointing: bool) -> int:
        """Elements kept per token by all the layers during the forward/backward (the peak)."""
        full_layer = (_DECODER_PER_WIDTH * self.width + _DECODER_PER_KV * self.kv_width + _DECODER_PER_MLP * self.mlp_width
                      if self.gated_mlp else _VIT_PER_WIDTH * self.width + _VIT_PER_MLP * self.mlp_width)
        if self.layers == 0:
            return 0
        if checkpointing:
            return self.layers * _CHECKPOINTED_PER_WIDTH * self.width + full_layer
        return self.layers * full_layer


@dataclass(frozen=True)
class ActivationEstimate:
    llm_bytes: int
    logits_bytes: int
    vit_bytes: int

    @property
    def total(self) -> int:
        return self.llm_bytes + self.logits_bytes + self.vit_bytes


def estimate_activations(llm: TransformerShape, vocab: int, vit: TransformerShape, *, batch_size: int,
                         sequence_length: int, vit_tokens: int, checkpointing: bool, dtype: torch.dtype) -> ActivationEstimate:
    """Activation bytes of one micro-step: ``batch_size`` samples of ``sequence_length`` LLM tokens
    (text + packed visual tokens), each image ``vit_tokens`` ViT tokens (crops x (patches + 1))."""
    dtype_bytes = torch.finfo(dtype).bits // 8
    llm_tokens = batch_size * sequence_length
    return ActivationEstimate(
        llm_bytes=llm_tokens * llm.elements_per_token(checkpointing) * dtype_bytes,
        logits_bytes=llm_tokens * vocab * (dtype_bytes + _LOSS_FP32_COPIES * _FP32_BYTES),
        vit_bytes=batch_size * vit_tokens * vit.elements_per_token(checkpointing) * dtype_bytes,
    )


def llm_shape(config) -> TransformerShape:
    """The decoder shape of a transformers llama / mistral / qwen2 config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return TransformerShape(config.num_hidden_layers, config.hidden_size, config.intermediate_size, kv_heads * head_dim, True)


def vit_shape(clip_config, layers_with_gradients: int) -> TransformerShape:
    return TransformerShape(layers_with_gradients, clip_config.hidden_size, clip_config.intermediate_size,
                            clip_config.hidden_size, False)
