"""The high-resolution branch: a timm ConvNeXt over the whole page on the high-resolution canvas.

Its input is the page resized from the original pixels into the ViT canvas x 32/14 (672x672 ->
1536x1536; ``anyres.preprocess`` with a high-resolution scale), never the ViT canvas blown up. At
that size stage 4 (stride 32) has exactly canvas/14 cells, one per ViT patch, and stages 1-3 have
8, 4 and 2 cells per ViT patch along each side.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn

from fila_cli.config import ConvNeXtConfig


class ConvNeXtBranch(nn.Module):
    def __init__(self, config: ConvNeXtConfig):
        super().__init__()
        self.config = config
        # Imported here, not at the top: fusion off never builds the branch, and importing timm
        # costs start-up time (0.1-0.5 s) that `fila ask` without fusion need not pay.
        import timm

        # No classifier head: only the stage outputs are used.
        self.model = timm.create_model(config.arch, pretrained=False, num_classes=0, **config.timm_kwargs())
        self.model.prune_intermediate_layers(indices=len(config.dims), prune_head=True, prune_norm=True)

    def load_timm_weights(self, path) -> None:
        """Initialise from timm's published ConvNeXt safetensors (e.g. the LAION CLIP ConvNeXt-L):
        the starting point of FILA training. The classifier head is skipped."""
        from fila_cli.vision.loaders.timm_convnext import load_timm_convnext_state

        self.model.load_state_dict(load_timm_convnext_state(path, self.model.state_dict()))

    @property
    def input_scale(self) -> Fraction:
        """High-resolution canvas side / ViT canvas side (32/14)."""
        return self.config.input_scale()

    def forward(self, highres_canvas: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] normalised high-resolution canvas -> four stage maps [B, C_k, H/stride_k, W/stride_k]."""
        stride = self.config.stage_strides[-1]
        height, width = highres_canvas.shape[-2:]
        if height % stride or width % stride:
            raise ValueError(f"high-resolution canvas {height}x{width} is not a whole number of stride-{stride} cells")
        weight = next(self.model.parameters())
        return self.stage_maps(highres_canvas.to(weight.dtype))

    def stage_maps(self, highres_canvas: torch.Tensor) -> list[torch.Tensor]:
        """timm's own stage outputs (the unit that ``compile_for_inference`` compiles)."""
        return self.model.forward_intermediates(highres_canvas, intermediates_only=True)
