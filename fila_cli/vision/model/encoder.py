"""The Hybrid Encoder: CLIP-ViT per view, ConvNeXt over the whole page at high resolution, CVFM
between them.

The entry point is ``encode(image)``: the page's original pixels in (an image file's pixels, or a
PDF page rendered by ``render_for_canvas(..., encoder.highres_scale)``), packed visual tokens out.
Underneath, ``preprocess(image)`` makes the ViT views and, with fusion on, the ConvNeXt's
high-resolution canvas from those same pixels, and ``forward(page)`` runs the model (training calls
these two). With no fusion configured, the ConvNeXt branch does not exist and the output is exactly
LLaVA-NeXT's packed image features.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from PIL import Image
from torch import nn

from fila_cli.config import AnyresConfig, ClipVisionConfig, FusionConfig
from fila_cli.documents.canvas import CanvasGeometry
from fila_cli.vision.anyres import AnyresImage, preprocess
from fila_cli.vision.model.alignment import align_stage
from fila_cli.vision.model.clip_tower import CLIPTower
from fila_cli.vision.model.convnext_branch import ConvNeXtBranch
from fila_cli.vision.model.fusion import CVFM
from fila_cli.vision.model.packing import count_visual_tokens, pack_features
from fila_cli.vision.model.projector import Projector


@dataclass
class EncodedPage:
    tokens: torch.Tensor  # [n_tokens, d], packed, global view first
    geometry: CanvasGeometry

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[0]


def feature_layer_number(vision_feature_layer: int, num_layers: int) -> int:
    """HF's ``vision_feature_layer`` (an index into hidden_states, which start with the embeddings)
    -> the 1-based number of the layer whose output is read: -2 of 24 layers -> 23."""
    number = vision_feature_layer if vision_feature_layer >= 0 else num_layers + 1 + vision_feature_layer
    if not 1 <= number <= num_layers:
        raise ValueError(f"feature layer {vision_feature_layer} is outside a tower of {num_layers} layers")
    return number


class HybridEncoder(nn.Module):
    def __init__(
        self,
        clip_config: ClipVisionConfig,
        feature_layer: int,
        llm_width: int,
        anyres: AnyresConfig | None = None,
        fusion: FusionConfig | None = None,
    ):
        """feature_layer: 1-based number of the ViT layer read (23 for LLaVA-1.6)."""
        super().__init__()
        self.anyres = anyres or AnyresConfig(crop_size=clip_config.image_size)
        if self.anyres.crop_size != clip_config.image_size:
            raise ValueError(f"crop size {self.anyres.crop_size} differs from the ViT's input size {clip_config.image_size}")
        self.vit = CLIPTower(clip_config, feature_layer)
        self.projector = Projector(clip_config.hidden_size, llm_width)
        self.image_newline = nn.Parameter(torch.zeros(llm_width))
        self.fusion_config = fusion
        self.convnext: ConvNeXtBranch | None = None
        self.cvfm: CVFM | None = None
        if fusion is not None:
            if max(fusion.interaction_layers) > feature_layer:
                raise ValueError(f"interaction layers {fusion.interaction_layers} go past the feature layer {feature_layer}")
            if fusion.vit_hidden_size != clip_config.hidden_size:
                raise ValueError(f"fusion expects a ViT {fusion.vit_hidden_size} wide, the tower is {clip_config.hidden_size}")
            _check_highres_tiling(self.anyres.crop_size, fusion.convnext.input_scale(), self.grid_side,
                                  fusion.convnext.stage_strides[-1])
            self.convnext = ConvNeXtBranch(fusion.convnext)
            self.cvfm = CVFM(fusion)

    @property
    def fusion_enabled(self) -> bool:
        return self.cvfm is not None

    @property
    def grid_side(self) -> int:
        return self.vit.config.image_size // self.vit.config.patch_size

    @property
    def highres_scale(self) -> Fraction | None:
        """ConvNeXt canvas / ViT canvas (32/14) with fusion on; None with fusion off (nothing extra
        to render). PDF pages are rendered at this multiple of the zoom that fills the ViT canvas."""
        return self.convnext.input_scale if self.convnext is not None else None

    @property
    def llm_width(self) -> int:
        return self.projector.out_features

    @property
    def dtype(self) -> torch.dtype:
        """The precision the encoder runs at (its weights')."""
        return self.image_newline.dtype

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    def count_tokens(self, geometry: CanvasGeometry) -> int:
        return count_visual_tokens(geometry, self.grid_side)

    def _aligned_stage_features(self, pages: list[AnyresImage]) -> dict[int, torch.Tensor]:
        """Stage index -> [n_views, grid^2, C] (or windows [n_views, grid^2, K, C]), the pages'
        views one after the other. Pages with high-resolution canvases of one shape go through
        the ConvNeXt as one batch."""
        assert self.convnext is not None and self.cvfm is not None
        if any(page.highres is None for page in pages):
            raise ValueError("fusion is on but the page has no high-resolution canvas; preprocess it with encoder.preprocess(image)")
        stages = self.cvfm.config.active_stages()
        maps_of: dict[int, list[torch.Tensor]] = {}  # page index -> its stage maps [C, H, W]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, page in enumerate(pages):
            by_shape.setdefault(tuple(page.highres.pixels.shape), []).append(index)  # type: ignore[union-attr]
        for indices in by_shape.values():
            canvases = torch.stack([pages[i].highres.pixels for i in indices]).to(self.image_newline.device)  # type: ignore[union-attr]
            stage_maps = self.convnext(canvases)
            for row, index in enumerate(indices):
                maps_of[index] = [stage_map[row] for stage_map in stage_maps]
        return {
            stage: torch.cat([align_stage(maps_of[i][stage], page.highres.geometry, self.grid_side, windowed=self.cvfm.windowed)  # type: ignore[union-attr]
                              for i, page in enumerate(pages)])
            for stage in stages
        }

    def _fusion_hook(self, pages: list[AnyresImage]):
        """Runs the ConvNeXt once for the pages; the returned hook fuses after each interaction layer."""
        aligned = self._aligned_stage_features(pages)
        cvfm = self.cvfm
        assert cvfm is not None

        def hook(layer_number: int, hidden: torch.Tensor) -> torch.Tensor:
            for stage in cvfm.stages_after_layer(layer_number):
                hidden = cvfm.fuse(stage, hidden, aligned[stage])
            return hidden

        return hook

    def view_features(self, page: AnyresImage | list[AnyresImage]) -> torch.Tensor:
        """Projected features of every view: [n_views, grid^2, d] (of several pages: their views
        one after the other, in one ViT batch)."""
        pages = page if isinstance(page, list) else [page]
        hook, hook_layers = None, None
        if self.cvfm is not None:
            config = self.cvfm.config
            hook, hook_layers = self._fusion_hook(pages), [config.interaction_layers[s] for s in config.active_stages()]
        views = torch.cat([p.views for p in pages]) if len(pages) > 1 else pages[0].views
        hidden = self.vit(views.to(self.image_newline.device), hook=hook, hook_layers=hook_layers)  # [n_views, 1 + grid^2, D]
        return self.projector(hidden[:, 1:])  # class token dropped

    def forward(self, page: AnyresImage) -> torch.Tensor:
        """Packed visual tokens [n_tokens, d]."""
        return pack_features(self.view_features(page), page.geometry, self.image_newline)

    def forward_batch(self, pages: list[AnyresImage]) -> list[torch.Tensor]:
        """Packed visual tokens of each page, the pages encoded as one batch: the same tokens as
        ``forward`` page by page, in fewer, larger matrix products (training's micro-batches)."""
        features = self.view_features(pages)
        tokens, first = [], 0
        for page in pages:
            n_views = page.views.shape[0]
            tokens.append(pack_features(features[first : first + n_views], page.geometry, self.image_newline))
            first += n_views
        return tokens

    def preprocess(self, image: Image.Image) -> AnyresImage:
        """The page's original pixels -> ViT views and canvas, plus (fusion on) the ConvNeXt's
        high-resolution canvas resized from the same pixels. On a CUDA GPU, computed there: the
        uint8 page is copied rather than the float32 views, and the GPU resizes."""
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        return preprocess(image, self.anyres, self.highres_scale, device)

    def page_tokens(self, image: Image.Image) -> EncodedPage:
        """Packed visual tokens of the original page image, on the encoder's device and dtype, with
        autograd. Training calls this; ``encode`` is this under inference mode, so both see the same input."""
        page = self.preprocess(image)
        return EncodedPage(tokens=self.forward(page), geometry=page.geometry)

    @torch.inference_mode()
    def encode(self, image: Image.Image) -> EncodedPage:
        """Original page image -> packed visual tokens (float32, on the CPU)."""
        page = self.page_tokens(image)
        return EncodedPage(tokens=host_float32(page.tokens), geometry=page.geometry)


def host_float32(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens on any device -> float32 on the CPU (what llama.cpp's embedding batches read). From a
    CUDA GPU: cast there, then one DMA copy into pinned memory (torch's host allocator caches the
    buffer), instead of a copy staged through pageable memory."""
    if tokens.device.type != "cuda":
        return tokens.float().cpu()
    host = torch.empty(tokens.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(tokens.float(), non_blocking=True)
    torch.cuda.current_stream(tokens.device).synchronize()
    return host


def _check_highres_tiling(crop_size: int, scale: Fraction, grid_side: int, last_stride: int) -> None:
    """The high-resolution crop must be whole pixels and a whole number of last-stage cells per ViT
    patch (768 = 24 x 32 at 32/14), or the stage maps cannot be cut crop by crop, patch by patch."""
    highres_crop = crop_size * scale
    if highres_crop.denominator != 1 or int(highres_crop) % (grid_side * last_stride):
        raise ValueError(f"ConvNeXt input scale {scale} turns the {crop_size}-pixel crop into {float(highres_crop):g} pixels, "
                         f"not a multiple of {grid_side} patches x stride {last_stride}; use 32/14 (or a multiple)")
