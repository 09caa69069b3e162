"""ConvNeXt weights as timm publishes them load into the branch and give timm's own stage maps."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from fila_cli.errors import ModelError
from fila_cli.vision.model.convnext_branch import ConvNeXtBranch
from tests.helpers.tiny_vision import tiny_fusion_config


def test_timm_safetensors_give_timms_stage_maps(tmp_path):
    config = tiny_fusion_config().convnext
    torch.manual_seed(0)
    # A timm checkpoint, with its classifier head, as `timm` saves it.
    reference = timm.create_model(config.arch, pretrained=False, num_classes=10, **config.timm_kwargs()).eval()
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    branch = ConvNeXtBranch(config).eval()
    branch.load_timm_weights(path)
    canvas = torch.randn(1, 3, 768, 1536)  # the high-resolution canvas of a 336x672 ViT canvas (x 32/14)
    with torch.no_grad():
        ours = branch(canvas)
        expected = reference.forward_intermediates(canvas, intermediates_only=True)
    assert [m.shape[-2:] for m in ours] == [(192, 384), (96, 192), (48, 96), (24, 48)]
    for got, want in zip(ours, expected):
        assert torch.equal(got, want)


def test_wrong_convnext_is_rejected(tmp_path):
    config = tiny_fusion_config().convnext
    other = timm.create_model("convnext_atto", pretrained=False, num_classes=0)  # default (wider) dims
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ModelError, match="other.safetensors.*shape"):
        ConvNeXtBranch(config).load_timm_weights(path)
    path.write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="other.safetensors"):
        ConvNeXtBranch(config).load_timm_weights(path)
