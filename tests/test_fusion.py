"""CVFM: zero gates change nothing, non-zero gates change the tokens, gradients reach only the
fusion's own parameters, and with fusion off the ConvNeXt never runs."""

from __future__ import annotations

import pytest
import torch
from timm.models.convnext import ConvNeXt

from fila_cli.vision.load import load_encoder, load_vision_weights
from fila_cli.vision.loaders.fusion_weights import save_fusion_weights
from fila_cli.vision.model.encoder import HybridEncoder
from tests.helpers.tiny_vision import (
    PAGE_SHAPES,
    page_image,
    save_llava_next_checkpoint,
    tiny_fusion_config,
    tiny_llava_next,
)

VARIANTS = [("concat", False), ("add", False), ("cross_attention", False), ("concat", True)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_llava_next_checkpoint(tiny_llava_next(seed=5), tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def image():
    return page_image(*PAGE_SHAPES["portrait_a4"], seed=4)


def write_fusion(checkpoint, path, variant, single_layer, gate_value):
    """Fusion weights as training would save them: random CVFM/ConvNeXt, gates set to gate_value."""
    weights = load_vision_weights(checkpoint)
    config = tiny_fusion_config(variant, single_layer)
    torch.manual_seed(11)
    encoder = HybridEncoder(weights.clip_config, 2, 64, fusion=config)
    with torch.no_grad():
        for name, param in encoder.cvfm.named_parameters():
            if name.endswith("gate"):
                param.fill_(gate_value)
    # Stage-1 output without a retrained projector: CVFM and ConvNeXt only.
    trained = {k: v for k, v in encoder.state_dict().items() if k.startswith(("cvfm.", "convnext."))}
    save_fusion_weights(path, config, trained)
    return path


@pytest.mark.parametrize("variant,single_layer", VARIANTS)
def test_zero_gates_change_nothing_and_open_gates_do(variant, single_layer, checkpoint, image, tmp_path):
    plain = load_encoder(checkpoint).encode(image).tokens
    closed = load_encoder(checkpoint, write_fusion(checkpoint, tmp_path / "closed.safetensors", variant, single_layer, 0.0))
    assert closed.fusion_enabled
    assert torch.equal(closed.encode(image).tokens, plain)
    opened = load_encoder(checkpoint, write_fusion(checkpoint, tmp_path / "open.safetensors", variant, single_layer, 0.5))
    changed = opened.encode(image).tokens
    assert changed.shape == plain.shape
    assert not torch.allclose(changed, plain, atol=1e-4)


@pytest.mark.parametrize("variant,single_layer", VARIANTS)
def test_gradients_reach_only_the_fusion(variant, single_layer, checkpoint, image, tmp_path):
    encoder = load_encoder(checkpoint, write_fusion(checkpoint, tmp_path / "f.safetensors", variant, single_layer, 0.3))
    # Stage 1 of training: ViT and ConvNeXt frozen, CVFM (and projector) train.
    for module in (encoder.vit, encoder.convnext):
        module.requires_grad_(False)
    page = encoder.preprocess(image)  # the entry point training uses
    encoder(page).square().mean().backward()
    stages = {int(k) for k in encoder.cvfm.stages}
    assert stages == ({3} if single_layer else {0, 1, 2, 3})
    for name, param in encoder.cvfm.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets no gradient"
    for module in (encoder.vit, encoder.convnext):
        assert all(p.grad is None for p in module.parameters())


def test_fusion_off_never_runs_the_convnext(checkpoint, image, monkeypatch):
    calls = []
    original = ConvNeXt.forward_intermediates
    monkeypatch.setattr(ConvNeXt, "forward_intermediates", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    encoder = load_encoder(checkpoint)
    encoder.encode(image)
    assert encoder.convnext is None and calls == []


def test_fusion_on_runs_the_convnext_once_per_page(checkpoint, image, monkeypatch, tmp_path):
    calls = []
    original = ConvNeXt.forward_intermediates
    monkeypatch.setattr(ConvNeXt, "forward_intermediates", lambda self, *a, **k: calls.append(a[0].shape) or original(self, *a, **k))
    encoder = load_encoder(checkpoint, write_fusion(checkpoint, tmp_path / "f.safetensors", "concat", False, 0.1))
    page = encoder.encode(image)
    # One pass over the whole canvas at 32/14 scale.
    canvas_h, canvas_w = page.geometry.canvas_size
    assert calls == [torch.Size([1, 3, canvas_h * 32 // 14, canvas_w * 32 // 14])]
