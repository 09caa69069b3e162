"""Vision weights from Hugging Face safetensors checkpoints.

Accepts a whole LLaVA-NeXT checkpoint directory (config.json + model*.safetensors, sharded or
not: vision tower, projector and image_newline are read, the language model is skipped without
being loaded) or a CLIP vision tower (a CLIPModel/CLIPVisionModel directory, or a single
.safetensors file with a config.json beside it). Only the tensors needed are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fila_cli.config import DEFAULT_GRID_PINPOINTS, ClipVisionConfig, from_dict
from fila_cli.errors import ModelError
from fila_cli.vision.loaders.identity import file_identity
from fila_cli.vision.loaders.vision_weights import VisionWeights

_TOWER_MARKERS = ("vision_tower.", "vision_model.")
_PROJECTOR_MARKER = "multi_modal_projector."
_NEWLINE_NAME = "image_newline"


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no .safetensors files in this directory; point --mmproj at a LLaVA-NeXT or CLIP checkpoint")
    return files


def _read_config(path: Path) -> dict:
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if not config_file.exists():
        raise ModelError(f"{path}: no config.json beside the weights; it is needed to know the vision tower's shape")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{config_file}: not valid JSON ({error.msg})") from None


def classify_key(key: str) -> tuple[str, str] | None:
    """Checkpoint key -> (part, name within the part), or None for tensors we skip (the LLM, the text tower)."""
    if _PROJECTOR_MARKER in key:
        return "projector", key.split(_PROJECTOR_MARKER, 1)[1]
    if key.rsplit(".", 1)[-1] == _NEWLINE_NAME or key.endswith("." + _NEWLINE_NAME) or key == _NEWLINE_NAME:
        return "newline", ""
    for marker in _TOWER_MARKERS:
        if marker in key and "text_model." not in key:
            name = key.split(marker, 1)[1]
            return "clip", name.removeprefix("vision_model.")
    return None


def load_hf_vision(path: str | Path) -> VisionWeights:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory")
    config = _read_config(path)
    vision_config_dict = config.get("vision_config", config)
    try:
        clip_config = from_dict(ClipVisionConfig, vision_config_dict)
    except (TypeError, ValueError) as error:
        raise ModelError(f"{path}: config.json does not describe a CLIP vision tower ({error})") from None

    parts: dict[str, dict[str, torch.Tensor]] = {"clip": {}, "projector": {}, "newline": {}}
    for file in _safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    where = classify_key(key)
                    if where is not None:
                        parts[where[0]][where[1]] = handle.get_tensor(key).float()
        except (SafetensorError, OSError) as error:
            raise ModelError(f"{file}: not a readable safetensors file ({error})") from None
    if not parts["clip"]:
        raise ModelError(f"{path}: holds no CLIP vision tower tensors (vision_tower.* or vision_model.*)")

    layer_ids = {int(k.split(".")[2]) for k in parts["clip"] if k.startswith("encoder.layers.")}
    full_layers = clip_config.num_hidden_layers
    clip_config.num_hidden_layers = len(layer_ids)
    return VisionWeights(
        clip_config=clip_config,
        clip_state=parts["clip"],
        projector_state=parts["projector"],
        image_newline=parts["newline"].get("", torch.empty(0)),
        image_grid_pinpoints=config.get("image_grid_pinpoints", [list(p) for p in DEFAULT_GRID_PINPOINTS]),
        vision_feature_layer=config.get("vision_feature_layer", -2),
        full_num_hidden_layers=full_layers,
        source=str(path),
        identity=file_identity(path),
    )
