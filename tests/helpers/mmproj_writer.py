"""Write LLaVA-1.6 ``mmproj`` GGUF files the way llama.cpp's converter does (test helper).

Follows ``convert_image_encoder_to_gguf.py`` (ggml-org/llama.cpp, ``examples/llava/``, later
``tools/mtmd/legacy-models/``) step by step, from HF-named tensors: the same metadata keys in the
same order, the same chain of string replacements for tensor names (so ``mlp.fc1`` lands in
``ffn_down``), the same dropping of blocks past the feature layer, the same dtype rule. It shares
no code with ``fila_cli.vision.loaders.mmproj_gguf``, which maps names back with explicit tables, so a
round trip through both is a real test of the loader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from gguf import GGUFWriter
from transformers import CLIPVisionConfig

HF_VISION_PREFIX = "vision_model."
HF_PROJECTOR_PREFIX = "multi_modal_projector."
# The converter's ftype: general.file_type 0 = all f32, 1 = mostly f16.
FILE_TYPES = {"f32": 0, "f16": 1}
# The converter's generic renaming, applied in this order to ``vision_model.*`` names.
CONVERTER_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("text_model", "t"),
    ("vision_model", "v"),
    ("encoder.layers", "blk"),
    ("embeddings.", ""),
    ("_proj", ""),
    ("self_attn.", "attn_"),
    ("layer_norm", "ln"),
    ("layernorm", "ln"),
    ("mlp.fc1", "ffn_down"),  # sic: the converter files fc1 under "down"
    ("mlp.fc2", "ffn_up"),
    ("embedding", "embd"),
    ("final", "post"),
    ("layrnorm", "ln"),
)
# With a LLaVA projector these never go into the file.
SKIPPED_TENSORS = (
    "vision_model.embeddings.position_ids",
    "vision_model.post_layernorm.weight",
    "vision_model.post_layernorm.bias",
)


def converter_tensor_name(hf_name: str) -> str:
    """GGUF name of an HF tensor (``vision_model.*``, ``multi_modal_projector.*``, ``image_newline``)."""
    if hf_name == "image_newline":
        return "model.image_newline"
    if hf_name.startswith(HF_PROJECTOR_PREFIX):
        name = hf_name.replace("multi_modal_projector", "mm")
        return name.replace("linear_1", "0").replace("linear_2", "2")
    for old, new in CONVERTER_REPLACEMENTS:
        hf_name = hf_name.replace(old, new)
    return hf_name


def _non_negative_feature_layers(vision_feature_layer: int | Sequence[int], num_layers: int) -> list[int]:
    """The converter's conversion of HF's (possibly negative) feature layers to hidden_states indices."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    return [layer if layer >= 0 else num_layers + layer + 1 for layer in layers]


def _with_vision_prefix(clip_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefixed = {}
    for name, value in clip_state.items():
        prefixed[name if name.startswith(HF_VISION_PREFIX) else HF_VISION_PREFIX + name] = value
    return prefixed


def _block_index(hf_name: str) -> int | None:
    parts = hf_name.split(".")
    if parts[1:3] == ["encoder", "layers"]:
        return int(parts[3])
    return None


def write_mmproj_gguf(
    path: str | os.PathLike[str],
    *,
    clip_state: Mapping[str, torch.Tensor],
    projector_state: Mapping[str, torch.Tensor],
    image_newline: torch.Tensor,
    clip_config: CLIPVisionConfig,
    image_grid_pinpoints: Sequence[Sequence[int]] | None,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    drop_last_block: bool = True,
    dtype: Literal["f16", "f32"] = "f16",
    newline_key: str = "model.image_newline",
    vision_feature_layer: int | Sequence[int] | None = None,
    projector_type: str = "mlp",
    ffn_names: Literal["legacy", "hf"] = "legacy",
) -> None:
    """Write an mmproj as ``convert_image_encoder_to_gguf.py --llava-projector`` would.

    ``clip_state``: a ``CLIPVisionModel`` state dict (keys with or without ``vision_model.``);
    ``projector_state``: ``LlavaNextMultiModalProjector`` keys (``linear_1.weight``, ...).
    ``vision_feature_layer``: HF's config value, or None for the original LLaVA format, which has
    none; with it the converter writes ``clip.vision.feature_layer`` and keeps the blocks up to the
    deepest feature layer, without it the last block is dropped (``drop_last_block=False`` keeps
    every block, as one short-lived converter version did). ``ffn_names="hf"`` names the FFN as
    ``convert_hf_to_gguf.py --mmproj`` does (fc1 -> ffn_up), to test the loader's detection.
    Tensors are written exactly as given, so tests can plant wrong shapes or leave tensors out.
    """
    state = _with_vision_prefix(clip_state)
    num_layers = clip_config.num_hidden_layers
    feature_layers = None
    if vision_feature_layer is not None:
        feature_layers = _non_negative_feature_layers(vision_feature_layer, num_layers)
        kept_blocks = max(feature_layers)
    else:
        kept_blocks = num_layers - 1 if drop_last_block else num_layers

    writer = GGUFWriter(path, arch="clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_name("fila-test-llava-vision-tower")
    writer.add_description("image encoder for LLaVA")
    writer.add_string("clip.projector_type", projector_type)

    writer.add_uint32("clip.vision.image_size", clip_config.image_size)
    writer.add_uint32("clip.vision.patch_size", clip_config.patch_size)
    writer.add_uint32("clip.vision.embedding_length", clip_config.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", clip_config.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", clip_config.projection_dim)
    writer.add_uint32("clip.vision.attention.head_count", clip_config.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", clip_config.layer_norm_eps)
    writer.add_uint32("clip.vision.block_count", kept_blocks)
    if image_grid_pinpoints is not None:
        # The config's pairs, flattened in order.
        flat = [int(side) for pair in image_grid_pinpoints for side in pair]
        writer.add_array("clip.vision.image_grid_pinpoints", flat)
    if feature_layers:
        writer.add_array("clip.vision.feature_layer", feature_layers)
    writer.add_array("clip.vision.image_mean", [float(v) for v in image_mean])
    writer.add_array("clip.vision.image_std", [float(v) for v in image_std])
    writer.add_bool("clip.use_gelu", clip_config.hidden_act == "gelu")

    # Projector first (and the newline, which LLaVA-NeXT keeps beside it): 2-D always f16.
    projector_items = [(HF_PROJECTOR_PREFIX + name, value) for name, value in projector_state.items()]
    for hf_name, value in [*projector_items, ("image_newline", image_newline)]:
        name = newline_key if hf_name == "image_newline" else converter_tensor_name(hf_name)
        data = value.detach().float().squeeze().numpy()
        data = data.astype(np.float16 if data.ndim in (2, 4) else np.float32)
        writer.add_tensor(name, data)

    for hf_name, value in state.items():
        block = _block_index(hf_name)
        if hf_name in SKIPPED_TENSORS or (block is not None and block >= kept_blocks):
            continue
        name = converter_tensor_name(hf_name)
        if ffn_names == "hf":
            name = name.replace("ffn_down", "ffn_tmp").replace("ffn_up", "ffn_down").replace("ffn_tmp", "ffn_up")
        data = value.detach().float().squeeze().numpy()
        if data.ndim == 4:  # ggml's convolution wants f16 kernels, whatever the file type
            data = data.astype(np.float16)
        elif dtype == "f16" and name.endswith(".weight") and data.ndim == 2:
            data = data.astype(np.float16)
        else:
            data = data.astype(np.float32)
        writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
