"""FILA fusion weights: CVFM (and the ConvNeXt it was trained with, and the projector and
image_newline when stage 1/2 trained them) as safetensors, with the FusionConfig as JSON beside.

Layout of ``NAME.safetensors``: ``cvfm.stages.{k}.*``, ``convnext.model.*`` (the ConvNeXt branch),
optionally ``projector.*`` and ``image_newline``. ``NAME.json`` holds the FusionConfig.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fila_cli.atomic_files import atomic_path
from fila_cli.config import FusionConfig, fusion_config_path, load_json, save_json
from fila_cli.errors import ModelError

_PARTS = ("cvfm.", "convnext.", "projector.", "image_newline")


def save_fusion_weights(path: str | Path, config: FusionConfig, state: dict[str, torch.Tensor]) -> None:
    """state: the encoder's state dict restricted to the trained parts (keys as HybridEncoder's)."""
    kept = {k: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith(_PARTS)}
    with atomic_path(path) as temporary:  # each file whole, old or new, whatever interrupts the write
        save_file(kept, str(temporary), metadata={"format": "fila-fusion"})
    save_json(config, fusion_config_path(path))


def load_fusion_config(path: str | Path) -> FusionConfig:
    """The FusionConfig beside fusion weights ``path``, without reading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such fusion weights file; pass the .safetensors written by FILA training")
    config_file = fusion_config_path(path)
    if not config_file.is_file():
        raise ModelError(f"{path}: its fusion config {config_file.name} is missing beside it")
    try:
        return load_json(FusionConfig, config_file)
    except (ValueError, TypeError) as error:
        raise ModelError(f"{config_file}: not a valid fusion config ({error})") from None


def load_fusion_weights(path: str | Path) -> tuple[FusionConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    config = load_fusion_config(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{path}: not a readable safetensors file ({error})") from None
    if not any(k.startswith("cvfm.") for k in state):
        raise ModelError(f"{path}: holds no CVFM tensors (cvfm.*): not a FILA fusion weights file")
    return config, state
