"""Read a LLaVA-1.6 ``mmproj`` GGUF (llama.cpp's image-encoder file) into :class:`VisionWeights`.

llama.cpp ships the vision half of LLaVA as a separate GGUF, written by
``examples/llava/convert_image_encoder_to_gguf.py`` (later ``tools/mtmd/legacy-models/``). This
module maps that file back to Hugging Face transformers' names, so the model code loads it like
any ``CLIPVisionModel`` checkpoint plus a ``LlavaNextMultiModalProjector``.

What the converter does, and how it is undone here:

- Names: ``vision_model.`` -> ``v.``, ``encoder.layers.{i}`` -> ``blk.{i}``, ``self_attn.q_proj``
  -> ``attn_q`` (k, v, ``out``), ``layer_norm1/2`` -> ``ln1/2``, ``pre_layrnorm`` -> ``pre_ln``,
  ``embeddings.*_embedding`` -> ``*_embd``. The projector's ``linear_1``/``linear_2`` (or the
  original LLaVA's ``mm_projector.0``/``.2``) become ``mm.0``/``mm.2``; the newline is
  ``model.image_newline`` (``v.image_newline`` in newer files).
- FFN: the legacy converter stores HF ``fc1`` as ``ffn_down`` and ``fc2`` as ``ffn_up`` (its
  string replacement has them the wrong way round); ``convert_hf_to_gguf.py --mmproj`` uses the
  sensible names. Like llama.cpp's ``clip.cpp``, tell them apart by shape: ``fc1`` maps
  hidden -> intermediate.
- Blocks: for a LLaVA projector the converter keeps the blocks up to the feature layer — by
  default it drops the last block (24 -> 23 for ViT-L/14) and writes ``clip.vision.block_count``
  as the number of blocks *kept*. The file never says how deep the original tower was.
- No post-layernorm (LLaVA reads a hidden state, not the pooled output).
- Dtypes: f16 for 2-D ``.weight`` tensors (and always for the 4-D patch embedding and the 2-D
  projector weights, even with ``--use-f32``), f32 for biases, norms and the class embedding.
  Everything comes back as float32.
- Shapes: GGUF stores dimensions innermost-first; ``gguf``'s reader already hands back numpy
  arrays in PyTorch order (patch embedding [hidden, 3, patch, patch]).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from fila_cli.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipVisionConfig
from fila_cli.errors import ModelError
from fila_cli.gguf_files import CLIP_ARCHITECTURE, KEY_ARCHITECTURE, open_gguf
from fila_cli.vision.loaders.identity import file_identity
from fila_cli.vision.loaders.vision_weights import VisionWeights

# The LLaVA-1.5/1.6 projector: Linear -> GELU -> Linear. Others (ldp, ldpv2, resampler, ...) are
# different networks that fila does not implement.
SUPPORTED_PROJECTOR_TYPE = "mlp"

METADATA_PREFIXES = ("general.", "clip.")
KEY_HAS_VISION_ENCODER = "clip.has_vision_encoder"
KEY_HAS_LLAVA_PROJECTOR = "clip.has_llava_projector"
KEY_PROJECTOR_TYPE = "clip.projector_type"
KEY_VISION_PROJECTOR_TYPE = "clip.vision.projector_type"  # files with several modalities
KEY_USE_GELU = "clip.use_gelu"
KEY_USE_SILU = "clip.use_silu"
KEY_IMAGE_SIZE = "clip.vision.image_size"
KEY_PATCH_SIZE = "clip.vision.patch_size"
KEY_EMBEDDING_LENGTH = "clip.vision.embedding_length"
KEY_FEED_FORWARD_LENGTH = "clip.vision.feed_forward_length"
KEY_HEAD_COUNT = "clip.vision.attention.head_count"
KEY_LAYER_NORM_EPS = "clip.vision.attention.layer_norm_epsilon"
KEY_BLOCK_COUNT = "clip.vision.block_count"
KEY_PROJECTION_DIM = "clip.vision.projection_dim"
KEY_GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"
KEY_FEATURE_LAYER = "clip.vision.feature_layer"
KEY_IMAGE_MEAN = "clip.vision.image_mean"
KEY_IMAGE_STD = "clip.vision.image_std"

# Tensors outside the blocks: llama.cpp name -> CLIPVisionModel name (without ``vision_model.``).
EMBEDDING_TENSORS: dict[str, str] = {
    "v.class_embd": "embeddings.class_embedding",
    "v.patch_embd.weight": "embeddings.patch_embedding.weight",
    "v.position_embd.weight": "embeddings.position_embedding.weight",
    "v.pre_ln.weight": "pre_layrnorm.weight",
    "v.pre_ln.bias": "pre_layrnorm.bias",
}
# LLaVA drops CLIP's post-layernorm, but a file may still carry it.
OPTIONAL_TENSORS: dict[str, str] = {
    "v.post_ln.weight": "post_layernorm.weight",
    "v.post_ln.bias": "post_layernorm.bias",
}
# Inside block i: llama.cpp module -> HF module under ``encoder.layers.{i}.``. The FFN is mapped
# separately (by shape) because its names depend on the converter.
BLOCK_MODULES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
}
FFN_MODULES = ("ffn_up", "ffn_down")
PARAMETERS = ("weight", "bias")
PROJECTOR_TENSORS: dict[str, str] = {
    "mm.0.weight": "linear_1.weight",
    "mm.0.bias": "linear_1.bias",
    "mm.2.weight": "linear_2.weight",
    "mm.2.bias": "linear_2.bias",
}
# Older files (the legacy converter) use the first name, newer llama.cpp the second.
NEWLINE_TENSORS = ("model.image_newline", "v.image_newline")

BLOCK_TENSOR_RE = re.compile(r"^v\.blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
# Without pinpoints in the file, LLaVA-1.6's five canvases in units of the crop size, [h, w].
LLAVA_NEXT_GRID_IN_CROPS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


@dataclass
class MmprojHparams:
    """The metadata of an mmproj file that fila uses, already in HF's conventions."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    # ``clip.vision.block_count``: the blocks the converter kept (current converters) or, in some
    # old files, the original depth.
    block_count: int
    projection_dim: int | None
    # Non-negative hidden_states indices (0 = embeddings, i = output of block i), or None.
    feature_layers: list[int] | None
    image_grid_pinpoints: list[list[int]]
    image_mean: list[float] | None
    image_std: list[float] | None


def load_mmproj_gguf(path: str | os.PathLike[str]) -> VisionWeights:
    """Read a LLaVA-1.6 mmproj GGUF; tensors come back as float32 with HF names.

    Raises :class:`ModelError` (one line naming the file) for anything that is not a complete,
    self-consistent LLaVA-1.6 ``mlp`` mmproj.
    """
    path = Path(path)
    reader = _open_reader(path)
    # Only the keys an mmproj has: an LLM passed by mistake carries a vocabulary of 100k+ strings.
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith(METADATA_PREFIXES)}
    _check_is_llava_mmproj(fields, reader, path)
    hparams = _read_hparams(fields, path)

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(tensor.shape.tolist())) for name, tensor in tensors.items()}
    num_blocks = _count_blocks(shapes, path)
    name_map = _hf_names(shapes, hparams, num_blocks, path)
    _check_shapes(shapes, name_map, hparams, path)
    vision_feature_layer, full_num_hidden_layers = _resolve_feature_layer(hparams, num_blocks, path)

    clip_state: dict[str, torch.Tensor] = {}
    projector_state: dict[str, torch.Tensor] = {}
    image_newline: torch.Tensor | None = None
    for gguf_name, (part, hf_name) in name_map.items():
        value = _to_float32(tensors[gguf_name], shapes[gguf_name], path)
        if part == "clip":
            clip_state[hf_name] = value
        elif part == "projector":
            projector_state[hf_name] = value
        else:
            image_newline = value
    assert image_newline is not None  # _hf_names guarantees it

    clip_config = ClipVisionConfig(
        hidden_size=hparams.hidden_size,
        intermediate_size=hparams.intermediate_size,
        num_hidden_layers=num_blocks,
        num_attention_heads=hparams.num_attention_heads,
        num_channels=shapes["v.patch_embd.weight"][1],
        image_size=hparams.image_size,
        patch_size=hparams.patch_size,
        hidden_act=hparams.hidden_act,
        layer_norm_eps=hparams.layer_norm_eps,
        **({"projection_dim": hparams.projection_dim} if hparams.projection_dim else {}),
    )
    return VisionWeights(
        clip_config=clip_config,
        clip_state=clip_state,
        projector_state=projector_state,
        image_newline=image_newline,
        image_grid_pinpoints=hparams.image_grid_pinpoints,
        image_mean=hparams.image_mean or list(OPENAI_CLIP_MEAN),
        image_std=hparams.image_std or list(OPENAI_CLIP_STD),
        vision_feature_layer=vision_feature_layer,
        full_num_hidden_layers=full_num_hidden_layers,
        source=str(path),
        identity=file_identity(path),
    )


def _open_reader(path: Path) -> GGUFReader:
    return open_gguf(path, "mmproj", "pass a LLaVA-1.6 mmproj GGUF (e.g. mmproj-model-f16.gguf), downloaded again if it was cut short")


def _check_is_llava_mmproj(fields: dict[str, Any], reader: GGUFReader, path: Path) -> None:
    architecture = fields.get(KEY_ARCHITECTURE)
    if architecture != CLIP_ARCHITECTURE:
        raise ModelError(
            f"{path}: general.architecture is {architecture!r}, not 'clip': this is a language model or "
            "another GGUF, not an mmproj; pass the LLaVA-1.6 mmproj (vision encoder) file"
        )
    has_vision_tensors = any(tensor.name.startswith("v.") for tensor in reader.tensors)
    if fields.get(KEY_HAS_VISION_ENCODER) is False or not has_vision_tensors:
        raise ModelError(f"{path}: this CLIP GGUF has no vision encoder; pass a LLaVA-1.6 mmproj GGUF")
    projector_type = fields.get(KEY_PROJECTOR_TYPE, fields.get(KEY_VISION_PROJECTOR_TYPE))
    if projector_type is None:
        if not fields.get(KEY_HAS_LLAVA_PROJECTOR, False):
            raise ModelError(f"{path}: a plain CLIP encoder without a LLaVA projector; pass a LLaVA-1.6 mmproj GGUF")
        projector_type = SUPPORTED_PROJECTOR_TYPE  # llama.cpp's default for files without the key
    if projector_type != SUPPORTED_PROJECTOR_TYPE:
        raise ModelError(
            f"{path}: unsupported projector {projector_type!r} (fila needs LLaVA-1.6's "
            f"{SUPPORTED_PROJECTOR_TYPE!r} projector); pass a LLaVA-1.6 mmproj GGUF"
        )


def _corrupt(path: Path, what: str) -> ModelError:
    return ModelError(f"{path}: {what}; the mmproj is corrupt or incomplete: download or convert it again")


def _first_names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _required(fields: dict[str, Any], key: str, path: Path) -> Any:
    if key not in fields:
        raise _corrupt(path, f"metadata key {key} is missing")
    return fields[key]


def _float32_decimal(value: float) -> float:
    """The shortest decimal that rounds to the same float32: 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(value)))


def _read_hparams(fields: dict[str, Any], path: Path) -> MmprojHparams:
    image_size = int(_required(fields, KEY_IMAGE_SIZE, path))
    patch_size = int(_required(fields, KEY_PATCH_SIZE, path))
    hidden_size = int(_required(fields, KEY_EMBEDDING_LENGTH, path))
    num_heads = int(_required(fields, KEY_HEAD_COUNT, path))
    if patch_size <= 0 or image_size % patch_size:
        raise _corrupt(path, f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if num_heads <= 0 or hidden_size % num_heads:
        raise _corrupt(path, f"embedding_length {hidden_size} is not divisible by head_count {num_heads}")

    # The converter writes use_gelu = (hidden_act == "gelu"); CLIP ViT-L/14 uses quick_gelu.
    if fields.get(KEY_USE_GELU, False):
        hidden_act = "gelu"
    elif fields.get(KEY_USE_SILU, False):
        hidden_act = "silu"
    else:
        hidden_act = "quick_gelu"

    feature_layers = fields.get(KEY_FEATURE_LAYER)
    if feature_layers is not None:
        feature_layers = [int(layer) for layer in feature_layers]

    return MmprojHparams(
        hidden_size=hidden_size,
        intermediate_size=int(_required(fields, KEY_FEED_FORWARD_LENGTH, path)),
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        layer_norm_eps=_float32_decimal(_required(fields, KEY_LAYER_NORM_EPS, path)),
        hidden_act=hidden_act,
        block_count=int(_required(fields, KEY_BLOCK_COUNT, path)),
        projection_dim=int(fields[KEY_PROJECTION_DIM]) if fields.get(KEY_PROJECTION_DIM) else None,
        feature_layers=feature_layers,
        image_grid_pinpoints=_grid_pinpoints(fields.get(KEY_GRID_PINPOINTS), image_size, path),
        image_mean=_float_triplet(fields.get(KEY_IMAGE_MEAN), KEY_IMAGE_MEAN, path),
        image_std=_float_triplet(fields.get(KEY_IMAGE_STD), KEY_IMAGE_STD, path),
    )


def _grid_pinpoints(flat: list[int] | None, image_size: int, path: Path) -> list[list[int]]:
    """The converter flattens the source config's ``image_grid_pinpoints`` pair by pair, unchanged.

    So the file holds exactly the pairs of the LLaVA / llava-hf config, which HF reads as
    [height, width] (llama.cpp's clip.cpp reads each pair as width, height; for LLaVA-1.6's
    symmetric list that only changes tie-breaking). Returned as stored: HF's list.
    """
    if not flat:
        return [[rows * image_size, cols * image_size] for rows, cols in LLAVA_NEXT_GRID_IN_CROPS]
    if len(flat) % 2:
        raise _corrupt(path, f"{KEY_GRID_PINPOINTS} has an odd number of values ({len(flat)})")
    pinpoints = [[int(flat[i]), int(flat[i + 1])] for i in range(0, len(flat), 2)]
    if any(side <= 0 or side % image_size for pair in pinpoints for side in pair):
        raise _corrupt(path, f"{KEY_GRID_PINPOINTS} {pinpoints} are not multiples of image_size {image_size}")
    return pinpoints


def _float_triplet(values: list[float] | None, key: str, path: Path) -> list[float] | None:
    """Per-channel mean/std; the OpenAI CLIP constants come back with HF's exact digits."""
    if values is None:
        return None
    if len(values) != 3:
        raise _corrupt(path, f"{key} has {len(values)} values, expected 3 (RGB)")
    for known in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD):
        if np.array_equal(np.float32(values), np.float32(known)):
            return list(known)
    return [_float32_decimal(v) for v in values]


def _resolve_feature_layer(hparams: MmprojHparams, num_blocks: int, path: Path) -> tuple[int, int]:
    """HF's ``vision_feature_layer`` (negative) and the original tower depth.

    The file holds a non-negative hidden_states index L (``clip.vision.feature_layer``, written when
    the source config had ``vision_feature_layer``/``mm_vision_select_layer``), or none, in which
    case the converter dropped the last block and LLaVA's -2 is the last block present: L = blocks
    kept. The original depth N is not stored by current converters: an old file whose block_count
    exceeds the blocks present gives it; otherwise a file that stops at its feature layer had the
    next block dropped (LLaVA's -2 convention), so N = L + 1. Either way N + 1 + vision_feature_layer
    = L, the index the model code reads.
    """
    # Converters wrote either the blocks they kept or, in old files, the depth before dropping one.
    if hparams.block_count not in (num_blocks, num_blocks + 1):
        raise _corrupt(path, f"{KEY_BLOCK_COUNT} is {hparams.block_count} but the file holds {num_blocks} blocks")
    layers = hparams.feature_layers
    if layers:
        if len(layers) > 1:
            raise ModelError(
                f"{path}: several feature layers {layers} (a multi-layer projector such as granite-vision); "
                "fila supports LLaVA-1.6's single feature layer"
            )
        feature_index = layers[0]
    else:
        feature_index = num_blocks
    if not 0 < feature_index <= num_blocks:
        raise _corrupt(path, f"feature layer {feature_index} is outside the {num_blocks} blocks in the file")
    if hparams.block_count > num_blocks:
        full_depth = hparams.block_count
    elif num_blocks > feature_index:
        full_depth = num_blocks
    else:
        full_depth = feature_index + 1
    return feature_index - (full_depth + 1), full_depth


# --- tensors --------------------------------------------------------------------------------


def _count_blocks(shapes: dict[str, tuple[int, ...]], path: Path) -> int:
    indices = {int(match.group(1)) for name in shapes if (match := BLOCK_TENSOR_RE.match(name))}
    if not indices:
        raise ModelError(f"{path}: no vision blocks (v.blk.*) in the file; pass a LLaVA-1.6 mmproj GGUF")
    if indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise _corrupt(path, f"vision blocks {missing} are missing")
    return max(indices) + 1


def _ffn_names(shapes: dict[str, tuple[int, ...]], block: int, hparams: MmprojHparams) -> dict[str, str]:
    """llama.cpp FFN module -> HF module for one block, by which one maps hidden -> intermediate."""
    fc1_shape = (hparams.intermediate_size, hparams.hidden_size)
    legacy = {"ffn_down": "mlp.fc1", "ffn_up": "mlp.fc2"}  # convert_image_encoder_to_gguf.py
    if shapes.get(f"v.blk.{block}.ffn_down.weight") == fc1_shape:
        return legacy
    if shapes.get(f"v.blk.{block}.ffn_up.weight") == fc1_shape:
        return {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}  # convert_hf_to_gguf.py --mmproj
    return legacy  # neither fits: the shape check reports it under the legacy names


def _hf_names(
    shapes: dict[str, tuple[int, ...]], hparams: MmprojHparams, num_blocks: int, path: Path
) -> dict[str, tuple[str, str]]:
    """Every tensor of the file -> (part, HF name); part is clip, projector or newline."""
    required: dict[str, tuple[str, str]] = {name: ("clip", hf) for name, hf in EMBEDDING_TENSORS.items()}
    for block in range(num_blocks):
        modules = dict(BLOCK_MODULES) | _ffn_names(shapes, block, hparams)
        for module, hf_module in modules.items():
            for parameter in PARAMETERS:
                hf_name = f"encoder.layers.{block}.{hf_module}.{parameter}"
                required[f"v.blk.{block}.{module}.{parameter}"] = ("clip", hf_name)
    required |= {name: ("projector", hf) for name, hf in PROJECTOR_TENSORS.items()}

    missing = [name for name in required if name not in shapes]
    if missing:
        raise _corrupt(path, f"tensors missing: {_first_names(missing)}")

    newline = next((name for name in NEWLINE_TENSORS if name in shapes), None)
    if newline is None:
        raise ModelError(f"{path}: no image_newline tensor (a LLaVA-1.5 mmproj?); fila needs a LLaVA-1.6 mmproj")

    names = required | {name: ("clip", hf) for name, hf in OPTIONAL_TENSORS.items() if name in shapes}
    names[newline] = ("newline", "image_newline")
    unexpected = sorted(set(shapes) - set(names) - set(NEWLINE_TENSORS))
    if unexpected:
        raise ModelError(f"{path}: unexpected tensors {_first_names(unexpected)}: not a LLaVA-1.6 mmproj; pass one")
    return names


def _expected_shapes(hparams: MmprojHparams, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape implied by the metadata (and by mm.0 for the LLM width, not in metadata)."""
    hidden, ff, patch = hparams.hidden_size, hparams.intermediate_size, hparams.patch_size
    num_positions = (hparams.image_size // patch) ** 2 + 1  # + class token
    channels = shapes["v.patch_embd.weight"][1] if len(shapes["v.patch_embd.weight"]) == 4 else -1
    llm_width = shapes["mm.0.weight"][0]
    expected: dict[str, tuple[int, ...]] = {
        "embeddings.class_embedding": (hidden,),
        "embeddings.patch_embedding.weight": (hidden, channels, patch, patch),
        "embeddings.position_embedding.weight": (num_positions, hidden),
        "pre_layrnorm.weight": (hidden,),
        "pre_layrnorm.bias": (hidden,),
        "post_layernorm.weight": (hidden,),
        "post_layernorm.bias": (hidden,),
        "linear_1.weight": (llm_width, hidden),
        "linear_1.bias": (llm_width,),
        "linear_2.weight": (llm_width, llm_width),
        "linear_2.bias": (llm_width,),
        "image_newline": (llm_width,),
    }
    per_block = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (hidden, hidden),
        "self_attn.v_proj.weight": (hidden, hidden),
        "self_attn.out_proj.weight": (hidden, hidden),
        "mlp.fc1.weight": (ff, hidden),
        "mlp.fc1.bias": (ff,),
        "mlp.fc2.weight": (hidden, ff),
    }
    for suffix in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                   "self_attn.out_proj.bias", "layer_norm1.weight", "layer_norm1.bias",
                   "layer_norm2.weight", "layer_norm2.bias", "mlp.fc2.bias"):
        per_block[suffix] = (hidden,)
    return expected | {f"encoder.layers.*.{suffix}": shape for suffix, shape in per_block.items()}


def _check_shapes(
    shapes: dict[str, tuple[int, ...]], name_map: dict[str, tuple[str, str]], hparams: MmprojHparams, path: Path
) -> None:
    expected = _expected_shapes(hparams, shapes)
    for gguf_name, (_, hf_name) in name_map.items():
        pattern = re.sub(r"^encoder\.layers\.\d+\.", "encoder.layers.*.", hf_name)
        want = expected[pattern]
        if shapes[gguf_name] != want:
            got = list(shapes[gguf_name])
            raise _corrupt(path, f"tensor {gguf_name} has shape {got}, the metadata implies {list(want)}")


def _to_float32(tensor: Any, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        kind = tensor.tensor_type.name
        message = f"{path}: tensor {tensor.name} has type {kind}, which fila cannot read; use an f16 mmproj"
        raise ModelError(message) from error
    if tensor.tensor_type == GGMLQuantizationType.F32:
        values = values.copy()  # a view of the memory-mapped file
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))
