"""Fusion off: fila's packed visual tokens equal HF LLaVA-NeXT's image features."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaNextImageProcessor

from fila_cli.vision.anyres import preprocess
from fila_cli.vision.load import load_encoder
from tests.helpers.tiny_vision import PAGE_SHAPES, page_image, save_llava_next_checkpoint, tiny_llava_next

MAX_RELATIVE_ERROR = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def llava():
    return tiny_llava_next(seed=3)


@pytest.fixture(scope="module")
def checkpoint(llava, tmp_path_factory):
    return save_llava_next_checkpoint(llava, tmp_path_factory.mktemp("llava_next"))


def hf_packed_features(llava, image) -> torch.Tensor:
    processor = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                        image_grid_pinpoints=llava.config.image_grid_pinpoints)
    inputs = processor(image, return_tensors="pt")
    with torch.no_grad():
        output = llava.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
    features = output.pooler_output if hasattr(output, "pooler_output") else output
    return features[0]


@pytest.mark.parametrize("shape_name", sorted(PAGE_SHAPES))
def test_fusion_off_equals_hf_llava_next(shape_name, llava, checkpoint):
    image = page_image(*PAGE_SHAPES[shape_name], seed=7)
    encoder = load_encoder(checkpoint)
    assert encoder.convnext is None and not encoder.fusion_enabled
    ours = encoder.encode(image).tokens
    expected = hf_packed_features(llava, image)
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) <= MAX_RELATIVE_ERROR
    # The token count is known before encoding (used for context budgeting).
    assert encoder.count_tokens(preprocess(image, encoder.anyres).geometry) == expected.shape[0]


def test_both_checkpoint_layouts_load_the_same(llava, checkpoint, tmp_path):
    other = save_llava_next_checkpoint(llava, tmp_path / "transformers5", hub_layout=False)
    image = page_image(*PAGE_SHAPES["landscape"])
    assert torch.equal(load_encoder(checkpoint).encode(image).tokens, load_encoder(other).encode(image).tokens)


def test_bfloat16_close_to_float32(checkpoint):
    image = page_image(*PAGE_SHAPES["portrait_a4"], seed=2)
    full = load_encoder(checkpoint).encode(image).tokens
    half = load_encoder(checkpoint, dtype=torch.bfloat16).encode(image).tokens
    assert half.dtype == torch.float32  # tokens leave the encoder as float32
    assert relative_error(half, full) <= 2e-2


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_mmproj_gguf_gives_the_same_tokens_as_safetensors(dtype, llava, checkpoint, tmp_path):
    from tests.helpers.mmproj_writer import write_mmproj_gguf
    from tests.helpers.tiny_vision import vision_state_hf_names

    clip_state, projector_state, newline = vision_state_hf_names(llava)
    path = tmp_path / f"mmproj-{dtype}.gguf"
    # As llama.cpp's converter writes LLaVA-1.6: the last block dropped, 2-D weights in f16.
    write_mmproj_gguf(path, clip_state=clip_state, projector_state=projector_state, image_newline=newline,
                      clip_config=llava.config.vision_config, image_grid_pinpoints=llava.config.image_grid_pinpoints,
                      image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                      drop_last_block=True, dtype=dtype)
    from_gguf = load_encoder(path)
    assert len(from_gguf.vit.encoder.layers) == 2  # 23-of-24 analogue: feature layer is the last kept
    image = page_image(*PAGE_SHAPES["very_wide"], seed=9)
    ours = from_gguf.encode(image)
    reference = load_encoder(checkpoint).encode(image)
    assert ours.geometry == reference.geometry
    assert ours.tokens.shape == reference.tokens.shape
    assert relative_error(ours.tokens, reference.tokens) <= 2e-3  # f16 rounding of the weights (measured 3e-4)


def test_mismatched_checkpoint_names_file_and_tensor(llava, tmp_path):
    import json

    from fila_cli.errors import ModelError

    directory = save_llava_next_checkpoint(llava, tmp_path / "broken")
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 96  # the tensors say 64
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"broken: tensor encoder.layers.0.mlp.fc1.* has shape \(64,?.*expected \(96"):
        load_encoder(directory)
