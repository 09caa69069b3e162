"""Library entry points for the vision half: load weights, build the encoder, encode a page.

    from fila_cli.vision.load import load_encoder
    encoder = load_encoder("mmproj-model-f16.gguf")
    page = encoder.encode(image)        # page.tokens: [n_tokens, d] visual tokens for the LLM
"""

from __future__ import annotations

from pathlib import Path

import torch

from fila_cli.config import AnyresConfig, FusionConfig
from fila_cli.errors import ModelError
from fila_cli.gguf_files import is_gguf
from fila_cli.vision.loaders.fusion_weights import load_fusion_weights
from fila_cli.vision.loaders.hf_safetensors import load_hf_vision
from fila_cli.vision.loaders.vision_weights import VisionWeights
from fila_cli.vision.model.encoder import HybridEncoder, feature_layer_number


def load_vision_weights(path: str | Path) -> VisionWeights:
    """An mmproj GGUF file, or an HF safetensors checkpoint (file or directory)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory; pass an mmproj .gguf or a LLaVA-NeXT safetensors checkpoint")
    if path.is_file():
        if is_gguf(path):
            from fila_cli.vision.loaders.mmproj_gguf import load_mmproj_gguf

            return load_mmproj_gguf(path)
        if path.suffix != ".safetensors":
            raise ModelError(f"{path}: neither a GGUF nor a safetensors file; pass an mmproj .gguf or a LLaVA-NeXT checkpoint")
    return load_hf_vision(path)


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ModelError(f"{source}: {name} has shape {tuple(tensor.shape)}, expected {shape}")


def _load_projector(encoder: HybridEncoder, vision: VisionWeights) -> None:
    if not vision.projector_state or vision.image_newline.numel() == 0:
        raise ModelError(f"{vision.source}: has no LLaVA projector or image_newline; it is a bare vision tower, not LLaVA-NeXT weights")
    expected = encoder.projector.state_dict()
    for key, tensor in expected.items():
        if key not in vision.projector_state:
            raise ModelError(f"{vision.source}: projector tensor {key} is missing")
        _check_tensor(f"projector {key}", vision.projector_state[key], tuple(tensor.shape), vision.source)
    encoder.projector.load_state_dict({k: vision.projector_state[k] for k in expected})
    _check_tensor("image_newline", vision.image_newline, tuple(encoder.image_newline.shape), vision.source)
    encoder.image_newline.data.copy_(vision.image_newline)


def _load_fusion(encoder: HybridEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    own = encoder.state_dict()
    required = [k for k in own if k.startswith(("cvfm.", "convnext."))]
    missing = [k for k in required if k not in state]
    if missing:
        raise ModelError(f"{source}: fusion tensor {missing[0]} is missing ({len(missing)} in all)")
    # Trained projector / newline, when present, replace the LLaVA ones.
    loaded = {k: v for k, v in state.items() if k in own}
    for key, tensor in loaded.items():
        _check_tensor(key, tensor, tuple(own[key].shape), source)
    encoder.load_state_dict(loaded, strict=False)


def build_encoder(
    vision: VisionWeights,
    fusion_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    fusion_config: FusionConfig | None = None,
) -> HybridEncoder:
    """The encoder for ``vision``; with ``fusion_path`` trained fusion weights, or with
    ``fusion_config`` (and no path) a freshly initialised fusion to train."""
    config = vision.clip_config
    full_layers = vision.full_num_hidden_layers or config.num_hidden_layers
    try:
        layer = feature_layer_number(vision.vision_feature_layer, full_layers)
    except ValueError as error:
        raise ModelError(f"{vision.source}: {error}") from None
    if layer > config.num_hidden_layers:
        raise ModelError(f"{vision.source}: holds {config.num_hidden_layers} ViT layers but the feature layer is {layer}")
    if not vision.projector_state:
        raise ModelError(f"{vision.source}: has no LLaVA projector; it is a bare vision tower, not LLaVA-NeXT weights")
    llm_width = vision.projector_state["linear_2.weight"].shape[0]
    anyres = AnyresConfig(
        crop_size=config.image_size,
        image_grid_pinpoints=[list(p) for p in vision.image_grid_pinpoints],
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
    )
    fusion_state: dict[str, torch.Tensor] = {}
    if fusion_path is not None:
        fusion_config, fusion_state = load_fusion_weights(fusion_path)
    try:
        encoder = HybridEncoder(config, layer, llm_width, anyres, fusion_config)
    except ValueError as error:
        raise ModelError(f"{fusion_path or vision.source}: {error}") from None
    try:
        encoder.vit.load_checkpoint_state(vision.clip_state)
    except (KeyError, ValueError) as error:
        raise ModelError(f"{vision.source}: {error.args[0]}") from None
    _load_projector(encoder, vision)
    if fusion_path is not None:
        _load_fusion(encoder, fusion_state, str(fusion_path))
    return encoder.to(device=device, dtype=dtype).eval()


def load_encoder(
    vision_path: str | Path,
    fusion_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HybridEncoder:
    return build_encoder(load_vision_weights(vision_path), fusion_path, device=device, dtype=dtype)
