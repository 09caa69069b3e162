"""The ViT branch: CLIP vision layers (``clip_layers``: transformers' own, op for op), run one layer at a time.

LLaVA reads the hidden state after layer ``feature_layer`` (23 of 24 for LLaVA-1.6); running the
layers ourselves lets CVFM act between them and lets us stop at the feature layer instead of
computing layers nobody reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fila_cli.config import ClipVisionConfig
from fila_cli.vision.model.clip_layers import CLIPEncoderLayer, CLIPVisionEmbeddings

# Called after each layer with (1-based layer number, hidden [n_views, 1 + n_patches, width]).
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]

_CHECKPOINT_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "vision_model.")


def strip_checkpoint_prefix(key: str) -> str:
    """``vision_tower.vision_model.encoder...`` -> ``encoder...`` (names differ across checkpoints)."""
    for prefix in _CHECKPOINT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


class CLIPTower(nn.Module):
    """Embeddings, pre-layernorm and the first ``num_layers`` encoder layers of a CLIP ViT."""

    def __init__(self, config: ClipVisionConfig, num_layers: int):
        super().__init__()
        if num_layers > config.num_hidden_layers:
            raise ValueError(f"feature layer {num_layers} is past the tower's {config.num_hidden_layers} layers")
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))
        # Training: recompute each layer's activations in the backward pass instead of storing them.
        self.gradient_checkpointing = False

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor, hook: LayerHook | None = None,
                hook_layers: Sequence[int] | None = None) -> torch.Tensor:
        """[n_views, 3, S, S] -> hidden state after the last kept layer, [n_views, 1 + n_patches, width].

        ``hook`` runs after each layer numbered in ``hook_layers`` (1-based; None: after every layer).
        Between two hooked layers the layers run as one ``run_layers`` call, the unit that
        ``compile_for_inference`` compiles."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        n_layers = len(self.encoder.layers)
        if hook is None:
            stops: list[int] = []
        else:
            stops = sorted({n for n in (hook_layers if hook_layers is not None else range(1, n_layers + 1)) if n <= n_layers})
        start = 0
        for stop in [*stops, n_layers]:
            if stop > start:
                hidden = self.run_layers(hidden, start, stop)
            if hook is not None and stop in stops:
                hidden = hook(stop, hidden)
            start = stop
        return hidden

    def run_layers(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layers start+1 .. stop (1-based numbers) over hidden [n_views, 1 + n_patches, width]."""
        for layer in self.encoder.layers[start:stop]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, use_reentrant=False)
            else:
                hidden = layer(hidden)
        return hidden

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load HF-named CLIP vision weights; layers past the kept ones and post_layernorm are ignored."""
        own = self.state_dict()
        renamed = {strip_checkpoint_prefix(k): v for k, v in state.items()}
        wanted = {k: v for k, v in renamed.items() if k in own}
        missing = sorted(set(own) - set(wanted))
        if missing:
            raise KeyError(f"missing vision tower tensors: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        for key, value in wanted.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"tensor {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        self.load_state_dict(wanted, strict=True)

