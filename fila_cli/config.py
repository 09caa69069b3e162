"""Configuration dataclasses for the vision half, stored as JSON beside the weights.

Every number the model code depends on lives here (never as a hidden constant), so a file of
fusion weights carries the exact architecture it was trained with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, TypeVar

from fila_cli.atomic_files import write_bytes_atomically

# The paper's five canvases, [height, width], as HF's ``image_grid_pinpoints``.
DEFAULT_GRID_PINPOINTS: list[list[int]] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OPENAI_CLIP_MEAN: list[float] = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD: list[float] = [0.26862954, 0.26130258, 0.27577711]

# The FusionConfig is saved as JSON beside its weights, under the weights' stem.
FUSION_CONFIG_SUFFIX = ".json"

FusionVariant = Literal["concat", "add", "cross_attention"]
FUSION_VARIANTS: tuple[str, ...] = ("concat", "add", "cross_attention")

T = TypeVar("T")


@dataclass
class ClipVisionConfig:
    """A CLIP ViT's hyper-parameters: the fields (and defaults) of transformers' ``CLIPVisionConfig``
    that the vision tower reads, so a config.json's ``vision_config`` loads as it does in HF. Ours,
    not HF's class, because importing transformers' CLIP costs `fila ask` seconds of start-up."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512


@dataclass
class AnyresConfig:
    """LLaVA-NeXT dynamic cropping ("anyres")."""

    # Side of one crop and of the global view: the ViT's input size.
    crop_size: int = 336
    # Candidate canvases, [height, width]; each side a multiple of crop_size.
    image_grid_pinpoints: list[list[int]] = field(default_factory=lambda: [list(p) for p in DEFAULT_GRID_PINPOINTS])
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))

    def __post_init__(self) -> None:
        for height, width in self.image_grid_pinpoints:
            if height % self.crop_size or width % self.crop_size:
                raise ValueError(f"canvas {height}x{width} is not a multiple of the crop size {self.crop_size}")


@dataclass
class ConvNeXtConfig:
    """The high-resolution branch: a timm ConvNeXt whose four stage maps feed CVFM."""

    # timm architecture name; LAION CLIP ConvNeXt-L by default (weights tag clip_laion2b_ft_soup_320).
    arch: str = "convnext_large_mlp"
    # Overrides passed to timm.create_model (tests build tiny ConvNeXts with depths/dims).
    depths: list[int] | None = None
    dims: list[int] = field(default_factory=lambda: [192, 384, 768, 1536])
    # Total stride of each stage's output relative to the ConvNeXt input.
    stage_strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    # The ConvNeXt reads the page on a high-resolution canvas = the ViT canvas x numerator/denominator
    # (672x672 -> 1536x1536), rendered from the original pixels. 32/14 makes stage 4's stride-32
    # grid land exactly on the ViT's stride-14 patch grid: canvas/14 cells, one per ViT patch.
    input_scale_numerator: int = 32
    input_scale_denominator: int = 14

    def input_scale(self) -> Fraction:
        """High-resolution canvas side / ViT canvas side, exact (32/14 = 16/7)."""
        return Fraction(self.input_scale_numerator, self.input_scale_denominator)

    def timm_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dims": list(self.dims)}
        if self.depths is not None:
            kwargs["depths"] = list(self.depths)
        return kwargs


@dataclass
class FusionConfig:
    """The ConvNeXt-ViT Deep Fusion Module (CVFM) and where it runs."""

    variant: FusionVariant = "concat"
    # 1-based ViT layer numbers after which CVFM k fuses ConvNeXt stage k. The last one is the
    # feature layer LLaVA reads (hidden_states[-2] of a 24-layer tower).
    interaction_layers: list[int] = field(default_factory=lambda: [6, 12, 18, 23])
    # Ablation: fuse only at the last interaction layer (with the last stage's features).
    single_layer: bool = False
    # Hidden width of the concat variant's MLP, as a multiple of the ViT width.
    mlp_ratio: float = 1.0
    # Heads of the cross_attention variant.
    num_heads: int = 8
    vit_hidden_size: int = 1024
    convnext: ConvNeXtConfig = field(default_factory=ConvNeXtConfig)

    def __post_init__(self) -> None:
        if isinstance(self.convnext, dict):
            self.convnext = from_dict(ConvNeXtConfig, self.convnext)
        if self.variant not in FUSION_VARIANTS:
            raise ValueError(f"unknown fusion variant {self.variant!r}; expected one of {', '.join(FUSION_VARIANTS)}")
        if len(self.interaction_layers) != len(self.convnext.dims):
            raise ValueError("one interaction layer per ConvNeXt stage is required")

    def active_stages(self) -> list[int]:
        """0-based ConvNeXt stages that fuse: all four, or only the last for single-layer fusion."""
        n_stages = len(self.convnext.dims)
        return [n_stages - 1] if self.single_layer else list(range(n_stages))


def fusion_config_path(weights_path: str | Path) -> Path:
    """Where the FusionConfig of fusion weights ``NAME.safetensors`` lives: ``NAME.json`` beside them."""
    return Path(weights_path).with_suffix(FUSION_CONFIG_SUFFIX)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, ignoring unknown keys (forward compatibility)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def save_json(config: Any, path: str | Path) -> None:
    write_bytes_atomically(path, (json.dumps(asdict(config), indent=2) + "\n").encode())


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))
