"""Test-time builders of tiny random-weight vision models, written with the real writers.

Full-size geometry (336-pixel crops, 24x24 patch grid, the paper's canvases) with tiny widths, so
the shapes and alignment under test are the real ones and each forward pass still takes well
under a second on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

from fila_cli.config import DEFAULT_GRID_PINPOINTS, ConvNeXtConfig, FusionConfig

TINY_VIT_WIDTH = 32
TINY_LLM_WIDTH = 64
TINY_VIT_LAYERS = 3  # feature layer = 2 (hidden_states[-2])

# (height, width) of the six page shapes the cropping and packing tests cover.
PAGE_SHAPES: dict[str, tuple[int, int]] = {
    "portrait_a4": (1123, 794),
    "landscape": (794, 1123),
    "square": (800, 800),
    "tiny": (200, 150),
    "very_tall": (1800, 300),
    "very_wide": (200, 1600),
}


def tiny_clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=TINY_VIT_WIDTH,
        intermediate_size=2 * TINY_VIT_WIDTH,
        num_hidden_layers=TINY_VIT_LAYERS,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=16,
    )


def tiny_llava_next(seed: int = 0, llm_width: int = TINY_LLM_WIDTH) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    text = LlamaConfig(hidden_size=llm_width, intermediate_size=2 * llm_width, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, vocab_size=128)
    config = LlavaNextConfig(vision_config=tiny_clip_config(), text_config=text,
                             image_grid_pinpoints=[list(p) for p in DEFAULT_GRID_PINPOINTS],
                             vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_index=127)
    model = LlavaNextForConditionalGeneration(config).eval()
    # HF initialises some norms to exactly 1/0 and the newline small; randomise everything so a
    # swapped tensor cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            param.copy_((1.0 if is_norm_scale else 0.0) + torch.randn_like(param) * 0.05)
    return model


def save_llava_next_checkpoint(model: LlavaNextForConditionalGeneration, directory: Path, hub_layout: bool = True) -> Path:
    """config.json + model.safetensors. hub_layout names tensors as the public llava-hf
    checkpoints do (``vision_tower.vision_model.*``); otherwise as transformers 5 saves them."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        key = key.removeprefix("model.")
        if hub_layout and key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        state[key] = tensor.contiguous()
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return directory


def vision_state_hf_names(model: LlavaNextForConditionalGeneration) -> tuple[dict, dict, torch.Tensor]:
    """(clip_state, projector_state, image_newline) from a tiny LLaVA-NeXT, HF names."""
    inner = model.model
    clip = {k: v.detach().clone() for k, v in inner.vision_tower.state_dict().items()}
    projector = {k: v.detach().clone() for k, v in inner.multi_modal_projector.state_dict().items()}
    return clip, projector, inner.image_newline.detach().clone()


def tiny_fusion_config(variant: str = "concat", single_layer: bool = False) -> FusionConfig:
    return FusionConfig(
        variant=variant,  # type: ignore[arg-type]
        interaction_layers=[1, 1, 2, 2],
        single_layer=single_layer,
        num_heads=2,
        vit_hidden_size=TINY_VIT_WIDTH,
        convnext=ConvNeXtConfig(arch="convnext_atto", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32]),
    )


def page_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A page-like RGB image: noise for texture plus dark text-like bars."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(150, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for row in range(10, height - 10, max(12, height // 20)):
        draw.rectangle([10, row, max(11, width - 20), row + 4], fill=(20, 20, 20))
    return image
