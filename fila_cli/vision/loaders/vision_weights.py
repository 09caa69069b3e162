"""The vision half's weights in one neutral form, whatever file they came from.

Every loader (mmproj GGUF, HF safetensors) returns a :class:`VisionWeights` whose state dicts
use Hugging Face transformers' names, so the model code has one naming scheme to load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fila_cli.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipVisionConfig


@dataclass
class VisionWeights:
    # Config of the CLIP vision tower (hidden_size, num_hidden_layers, image_size, patch_size, ...).
    clip_config: ClipVisionConfig
    # Keys as in transformers' ``CLIPVisionModel`` checkpoints, with or without the leading
    # ``vision_model.`` (the model code strips it), e.g. ``embeddings.patch_embedding.weight``,
    # ``encoder.layers.0.mlp.fc1.weight``, ``pre_layrnorm.weight``. Missing trailing layers (mmproj files
    # often drop the last block) are simply absent; ``clip_config.num_hidden_layers`` counts the
    # layers present.
    clip_state: dict[str, torch.Tensor]
    # LLaVA-NeXT projector, keys as HF ``LlavaNextMultiModalProjector``:
    # ``linear_1.weight`` [d, 1024], ``linear_1.bias``, ``linear_2.weight`` [d, d], ``linear_2.bias``.
    projector_state: dict[str, torch.Tensor]
    # Learned row separator, [d].
    image_newline: torch.Tensor
    # Anyres canvases as [height, width] pairs, as HF's ``image_grid_pinpoints``.
    image_grid_pinpoints: list[list[int]]
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    # Feature layer as HF's ``vision_feature_layer`` (negative counts from the end of the full
    # tower's hidden_states, -2 for LLaVA-1.6).
    vision_feature_layer: int = -2
    # Number of layers of the *original* tower (24 for ViT-L/14), even when the file drops some.
    full_num_hidden_layers: int | None = None
    # Where it came from, for metadata and cache keys: a path and a content hash.
    source: str = ""
    identity: str = ""
