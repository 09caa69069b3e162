"""The mmproj GGUF loader against files written in llama.cpp's converter layout.

A tiny random CLIP tower (3 layers, width 32, 28x28 images of 2x2 patches) and projector are
written with ``tests/helpers/mmproj_writer.py`` (the converter's code path) and read back with
``fila_cli.vision.loaders.mmproj_gguf``: tensors, forward passes, metadata and error messages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from transformers import CLIPVisionConfig, CLIPVisionModel

from fila_cli.errors import ExitCode, ModelError
from fila_cli.vision.loaders.identity import file_identity
from fila_cli.vision.loaders.mmproj_gguf import load_mmproj_gguf
from tests.helpers.mmproj_writer import write_mmproj_gguf

HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 3
HEADS = 2
IMAGE_SIZE = 28
PATCH_SIZE = 14
LLM_WIDTH = 48
# [height, width], deliberately not symmetric so that a swap or reordering shows.
PINPOINTS = [[28, 56], [56, 56], [84, 28]]
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
RANDOM_WEIGHT_STD = 0.2


def _clip_config(hidden_act: str = "quick_gelu") -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=24,
    )


def _randomized_clip(config: CLIPVisionConfig) -> CLIPVisionModel:
    """A random tower whose norms and biases are not the init's ones and zeros (so mix-ups show)."""
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * RANDOM_WEIGHT_STD)
    return model


def _projector_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "linear_1.weight": torch.randn(LLM_WIDTH, HIDDEN, generator=generator),
        "linear_1.bias": torch.randn(LLM_WIDTH, generator=generator),
        "linear_2.weight": torch.randn(LLM_WIDTH, LLM_WIDTH, generator=generator),
        "linear_2.bias": torch.randn(LLM_WIDTH, generator=generator),
    }


@dataclass
class TinyLlava:
    """The vision half of a tiny LLaVA-1.6: CLIP tower, projector and row separator."""

    model: CLIPVisionModel
    projector: dict[str, torch.Tensor]
    newline: torch.Tensor


@pytest.fixture(scope="module")
def tiny() -> TinyLlava:
    newline = torch.randn(LLM_WIDTH, generator=torch.Generator().manual_seed(2))
    return TinyLlava(_randomized_clip(_clip_config()), _projector_state(), newline)


def _write(path: Path, tiny: TinyLlava, **overrides) -> Path:
    kwargs = dict(
        clip_state=tiny.model.state_dict(),
        projector_state=tiny.projector,
        image_newline=tiny.newline,
        clip_config=tiny.model.config,
        image_grid_pinpoints=PINPOINTS,
        image_mean=MEAN,
        image_std=STD,
    )
    kwargs.update(overrides)
    write_mmproj_gguf(path, **kwargs)
    return path


def _f16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.half().float()


def _expected_clip_state(model: CLIPVisionModel, dtype: str, kept_blocks: int) -> dict[str, torch.Tensor]:
    """What the file must give back: the kept tensors, f16-rounded where the converter stores f16."""
    expected = {}
    for name, value in model.state_dict().items():
        if name.startswith("post_layernorm."):
            continue
        if name.startswith("encoder.layers.") and int(name.split(".")[2]) >= kept_blocks:
            continue
        stored_f16 = value.ndim == 4 or (dtype == "f16" and value.ndim == 2 and name.endswith(".weight"))
        expected[name] = _f16(value) if stored_f16 else value
    return expected


# --- (a) tensors ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_round_trip_tensors(tmp_path, tiny, dtype):
    path = _write(tmp_path / f"mmproj-{dtype}.gguf", tiny, dtype=dtype)
    weights = load_mmproj_gguf(path)

    expected = _expected_clip_state(tiny.model, dtype, kept_blocks=LAYERS - 1)
    assert sorted(weights.clip_state) == sorted(expected)
    for name, value in expected.items():
        got = weights.clip_state[name]
        assert got.dtype == torch.float32 and got.shape == value.shape, name
        assert torch.equal(got, value), name
        # And within f16 rounding of the original, whatever the file's type.
        torch.testing.assert_close(got, tiny.model.state_dict()[name], rtol=1e-3, atol=1e-3)

    # Projector weights are f16 even in an f32 file (the converter's rule); biases f32.
    assert torch.equal(weights.projector_state["linear_1.weight"], _f16(tiny.projector["linear_1.weight"]))
    assert torch.equal(weights.projector_state["linear_2.weight"], _f16(tiny.projector["linear_2.weight"]))
    assert torch.equal(weights.projector_state["linear_1.bias"], tiny.projector["linear_1.bias"])
    assert torch.equal(weights.projector_state["linear_2.bias"], tiny.projector["linear_2.bias"])
    assert sorted(weights.projector_state) == sorted(tiny.projector)
    assert torch.equal(weights.image_newline, tiny.newline)

    assert weights.clip_config.num_hidden_layers == LAYERS - 1
    assert weights.full_num_hidden_layers == LAYERS
    assert weights.clip_state["embeddings.patch_embedding.weight"].shape == (HIDDEN, 3, PATCH_SIZE, PATCH_SIZE)
    assert weights.source == str(path)
    assert weights.identity == file_identity(path)


def test_writer_uses_the_converters_layout(tmp_path, tiny):
    """The file as llama.cpp's converter writes it, checked with gguf's reader, not our loader."""
    path = _write(tmp_path / "mmproj.gguf", tiny, dtype="f16")
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    f16, f32 = GGMLQuantizationType.F16, GGMLQuantizationType.F32

    def numpy_shape(name):
        return tuple(reversed(tensors[name].shape.tolist()))

    assert numpy_shape("v.patch_embd.weight") == (HIDDEN, 3, PATCH_SIZE, PATCH_SIZE)
    assert tensors["v.patch_embd.weight"].tensor_type == f16
    assert numpy_shape("v.position_embd.weight") == ((IMAGE_SIZE // PATCH_SIZE) ** 2 + 1, HIDDEN)
    assert tensors["v.class_embd"].tensor_type == f32
    # fc1 (hidden -> intermediate) sits in ffn_down, fc2 in ffn_up.
    assert numpy_shape("v.blk.0.ffn_down.weight") == (INTERMEDIATE, HIDDEN)
    assert numpy_shape("v.blk.0.ffn_up.weight") == (HIDDEN, INTERMEDIATE)
    np.testing.assert_array_equal(
        tensors["v.blk.0.ffn_down.weight"].data,
        tiny.model.state_dict()["encoder.layers.0.mlp.fc1.weight"].half().numpy(),
    )
    assert tensors["v.blk.1.attn_out.bias"].tensor_type == f32
    assert tensors["v.blk.1.ln2.weight"].tensor_type == f32
    assert tensors["v.blk.1.attn_q.weight"].tensor_type == f16
    assert tensors["mm.0.weight"].tensor_type == f16 and numpy_shape("mm.0.weight") == (LLM_WIDTH, HIDDEN)
    assert tensors["mm.2.bias"].tensor_type == f32
    assert "model.image_newline" in tensors and "v.pre_ln.weight" in tensors
    assert not [name for name in tensors if name.startswith(("v.post_ln", "v.blk.2."))]
    assert reader.fields["general.architecture"].contents() == "clip"
    assert reader.fields["clip.vision.block_count"].contents() == LAYERS - 1
    assert reader.fields["clip.use_gelu"].contents() is False
    assert reader.fields["clip.vision.image_grid_pinpoints"].contents() == [28, 56, 56, 56, 84, 28]


# --- (b) forward pass -----------------------------------------------------------------------


def _hidden_states(model: CLIPVisionModel, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_loaded_tower_reproduces_the_original_hidden_states(tmp_path, tiny, dtype):
    path = _write(tmp_path / "mmproj.gguf", tiny, dtype=dtype)
    weights = load_mmproj_gguf(path)

    # fila's ClipVisionConfig holds HF's field names: HF's own model is built from it.
    loaded = CLIPVisionModel(CLIPVisionConfig(**asdict(weights.clip_config))).eval()
    result = loaded.load_state_dict(weights.clip_state, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["post_layernorm.bias", "post_layernorm.weight"]
    assert weights.clip_config.hidden_act == "quick_gelu"

    # The reference: the original tower with the converter's f16 roundings applied.
    reference = CLIPVisionModel(tiny.model.config).eval()
    reference.load_state_dict(tiny.model.state_dict())
    reference.load_state_dict(_expected_clip_state(tiny.model, dtype, kept_blocks=LAYERS), strict=False)

    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    original_states = _hidden_states(reference, pixels)
    loaded_states = _hidden_states(loaded, pixels)
    assert len(loaded_states) == LAYERS  # embeddings + the 2 kept blocks
    for index, state in enumerate(loaded_states):
        torch.testing.assert_close(state, original_states[index], rtol=1e-5, atol=1e-5)

    # The feature layer the loader reports is the original tower's hidden_states[-2] ...
    feature_index = weights.full_num_hidden_layers + 1 + weights.vision_feature_layer
    assert weights.vision_feature_layer == -2
    torch.testing.assert_close(loaded_states[feature_index], original_states[-2], rtol=1e-5, atol=1e-5)
    # ... and it really depends on the weights: the untouched original is close, not equal, in f16.
    plain_states = _hidden_states(tiny.model, pixels)
    torch.testing.assert_close(loaded_states[feature_index], plain_states[-2], rtol=2e-2, atol=2e-2)


def test_hf_ffn_names_and_v_image_newline_load_the_same(tmp_path, tiny):
    """Files from convert_hf_to_gguf.py name the FFN the other way round; detected by shape."""
    legacy = load_mmproj_gguf(_write(tmp_path / "legacy.gguf", tiny))
    renamed = load_mmproj_gguf(
        _write(tmp_path / "hf.gguf", tiny, ffn_names="hf", newline_key="v.image_newline")
    )
    assert sorted(renamed.clip_state) == sorted(legacy.clip_state)
    for name, value in legacy.clip_state.items():
        assert torch.equal(renamed.clip_state[name], value), name
    assert torch.equal(renamed.image_newline, tiny.newline)


def test_gelu_towers_keep_gelu(tmp_path, tiny):
    gelu = TinyLlava(_randomized_clip(_clip_config(hidden_act="gelu")), tiny.projector, tiny.newline)
    weights = load_mmproj_gguf(_write(tmp_path / "gelu.gguf", gelu))
    assert weights.clip_config.hidden_act == "gelu"


# --- (c) metadata ---------------------------------------------------------------------------


def test_metadata_comes_back_in_hf_conventions(tmp_path, tiny):
    weights = load_mmproj_gguf(_write(tmp_path / "mmproj.gguf", tiny))
    assert weights.image_grid_pinpoints == PINPOINTS  # [height, width] pairs, order kept
    assert weights.image_mean == MEAN and weights.image_std == STD  # HF's digits, not float32 noise
    config = weights.clip_config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (HIDDEN, INTERMEDIATE, HEADS)
    assert (config.image_size, config.patch_size, config.num_channels) == (IMAGE_SIZE, PATCH_SIZE, 3)
    assert config.layer_norm_eps == 1e-5 and config.projection_dim == 24
    assert (weights.vision_feature_layer, weights.full_num_hidden_layers) == (-2, LAYERS)


@pytest.mark.parametrize(
    ("hf_feature_layer", "drop_last_block", "kept_blocks", "file_feature_layer", "expected"),
    [
        # Original LLaVA format: no key, last block dropped -> the last kept block is -2.
        (None, True, LAYERS - 1, None, (-2, LAYERS)),
        # llava-hf config: vision_feature_layer=-2 -> stored as [2], blocks kept up to it.
        (-2, True, LAYERS - 1, [LAYERS - 1], (-2, LAYERS)),
        # Non-negative HF value, same layer.
        (LAYERS - 1, True, LAYERS - 1, [LAYERS - 1], (-2, LAYERS)),
        # A converter that kept every block but recorded the feature layer.
        (None, False, LAYERS, None, (-2, LAYERS + 1)),
        (-3, True, LAYERS - 2, [LAYERS - 2], (-2, LAYERS - 1)),
    ],
)
def test_feature_layer_is_converted_to_hf(
    tmp_path, tiny, hf_feature_layer, drop_last_block, kept_blocks, file_feature_layer, expected
):
    path = _write(
        tmp_path / "mmproj.gguf", tiny,
        vision_feature_layer=hf_feature_layer, drop_last_block=drop_last_block,
    )
    field = GGUFReader(path).fields.get("clip.vision.feature_layer")
    assert (field.contents() if field else None) == file_feature_layer
    weights = load_mmproj_gguf(path)
    assert weights.clip_config.num_hidden_layers == kept_blocks
    assert (weights.vision_feature_layer, weights.full_num_hidden_layers) == expected
    # Whatever the depth bookkeeping, it points at the same hidden state of the kept blocks.
    feature_index = weights.full_num_hidden_layers + 1 + weights.vision_feature_layer
    assert feature_index == (file_feature_layer[0] if file_feature_layer else kept_blocks)


def test_feature_layer_kept_inside_a_full_tower(tmp_path, tiny):
    """An old converter kept all blocks but wrote feature_layer: the depth is the blocks present."""
    path = _write(tmp_path / "mmproj.gguf", tiny, vision_feature_layer=-2)
    # Rewrite with all blocks: the writer follows the current converter, so plant the extra block.
    full = tmp_path / "full.gguf"
    last_block = _block_tensors(tiny.model, LAYERS - 1)
    _copy_gguf(path, full, extra_tensors=last_block, kv_overrides={"clip.vision.block_count": LAYERS})
    weights = load_mmproj_gguf(full)
    assert weights.clip_config.num_hidden_layers == LAYERS
    assert (weights.vision_feature_layer, weights.full_num_hidden_layers) == (-2, LAYERS)


def test_old_files_count_the_dropped_block(tmp_path, tiny):
    """Some early converters wrote block_count = the original depth and dropped the last block."""
    path = _write(tmp_path / "mmproj.gguf", tiny)
    old = tmp_path / "old.gguf"
    _copy_gguf(path, old, kv_overrides={"clip.vision.block_count": LAYERS})
    weights = load_mmproj_gguf(old)
    assert weights.clip_config.num_hidden_layers == LAYERS - 1
    assert (weights.vision_feature_layer, weights.full_num_hidden_layers) == (-2, LAYERS)


@pytest.mark.parametrize("block_count", [LAYERS - 2, LAYERS + 1])
def test_block_count_inconsistent_with_the_blocks_is_rejected(tmp_path, tiny, block_count):
    path = _write(tmp_path / "mmproj.gguf", tiny)
    wrong = tmp_path / "wrong.gguf"
    _copy_gguf(path, wrong, kv_overrides={"clip.vision.block_count": block_count})
    _assert_model_error(wrong, "clip.vision.block_count", f"is {block_count}")


def test_quantized_tensors_are_dequantized(tmp_path, tiny):
    path = _write(tmp_path / "mmproj.gguf", tiny, dtype="f32")
    q8 = tmp_path / "mmproj-q8_0.gguf"
    _copy_gguf(path, q8, quantize={"v.blk.0.attn_q.weight": GGMLQuantizationType.Q8_0})
    weights = load_mmproj_gguf(q8)
    original = tiny.model.state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    q8_0 = quants.quantize(original.numpy(), GGMLQuantizationType.Q8_0)
    expected = torch.from_numpy(quants.dequantize(q8_0, GGMLQuantizationType.Q8_0))
    assert torch.equal(weights.clip_state["encoder.layers.0.self_attn.q_proj.weight"], expected)
    torch.testing.assert_close(expected, original, rtol=0, atol=0.02)


def test_other_normalisation_and_identity(tmp_path, tiny):
    first = _write(tmp_path / "a.gguf", tiny)
    second = _write(tmp_path / "b.gguf", tiny, image_mean=[0.5, 0.5, 0.5], image_std=[0.1, 0.2, 0.3])
    other = load_mmproj_gguf(second)
    assert other.image_mean == [0.5, 0.5, 0.5] and other.image_std == [0.1, 0.2, 0.3]
    # The identity names the content, not the path: a second file written from the same weights has
    # the first one's, and only the normalisation told apart (in the file's metadata) changes it.
    copy = _write(tmp_path / "copy.gguf", tiny)
    assert copy.read_bytes() == first.read_bytes()  # the premise: the same content, another file
    assert load_mmproj_gguf(copy).identity == load_mmproj_gguf(first).identity
    assert load_mmproj_gguf(first).identity != other.identity


# --- (d) errors -----------------------------------------------------------------------------


def _assert_model_error(path: Path, *fragments: str) -> None:
    with pytest.raises(ModelError) as caught:
        load_mmproj_gguf(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert caught.value.exit_code == ExitCode.MODEL
    for fragment in fragments:
        assert fragment in message, message


def _block_tensors(model: CLIPVisionModel, block: int) -> dict[str, np.ndarray]:
    """One block's tensors under the converter's names (f32), to plant into a copied file."""
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
        "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up",
    }
    state = model.state_dict()
    return {
        f"v.blk.{block}.{gguf}.{parameter}": state[f"encoder.layers.{block}.{hf}.{parameter}"].numpy()
        for hf, gguf in names.items()
        for parameter in ("weight", "bias")
    }


def _copy_gguf(
    source: Path,
    target: Path,
    *,
    drop: tuple[str, ...] = (),
    replace: dict[str, np.ndarray] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    kv_overrides: dict[str, object] | None = None,
    quantize: dict[str, GGMLQuantizationType] | None = None,
) -> None:
    """Copy a GGUF with tensors dropped, replaced, added or quantized and uint32/string keys changed."""
    reader = GGUFReader(source)
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    writer = GGUFWriter(target, arch=fields.pop("general.architecture").contents())
    overrides = dict(kv_overrides or {})
    for name, field in fields.items():
        value = overrides.pop(name, field.contents())
        writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for name, value in overrides.items():
        writer.add_string(name, value) if isinstance(value, str) else writer.add_uint32(name, value)
    for tensor in reader.tensors:
        if tensor.name in drop:
            continue
        data = (replace or {}).get(tensor.name, np.array(tensor.data))
        if tensor.name in (quantize or {}):
            qtype = quantize[tensor.name]
            writer.add_tensor(tensor.name, quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_garbage_file_is_rejected(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    _assert_model_error(path, "not a GGUF")


def test_truncated_gguf_is_rejected(tmp_path, tiny):
    path = _write(tmp_path / "mmproj.gguf", tiny)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    _assert_model_error(truncated, "corrupt or truncated")


def test_missing_file_is_rejected(tmp_path):
    _assert_model_error(tmp_path / "absent.gguf", "no such")


def test_a_language_model_gguf_is_rejected(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    writer = GGUFWriter(path, arch="llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_model_error(path, "'llama'", "not an mmproj")


def test_a_clip_without_vision_tensors_is_rejected(tmp_path):
    path = tmp_path / "text-clip.gguf"
    writer = GGUFWriter(path, arch="clip")
    writer.add_bool("clip.has_text_encoder", True)
    writer.add_bool("clip.has_vision_encoder", False)
    writer.add_tensor("t.token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_model_error(path, "no vision encoder")


def test_wrong_tensor_shape_is_rejected(tmp_path, tiny):
    state = dict(tiny.model.state_dict())
    state["encoder.layers.1.mlp.fc2.bias"] = torch.zeros(HIDDEN - 1)
    path = _write(tmp_path / "mmproj.gguf", tiny, clip_state=state)
    _assert_model_error(path, "v.blk.1.ffn_up.bias", f"[{HIDDEN - 1}]", f"[{HIDDEN}]")


def test_position_embedding_inconsistent_with_image_size_is_rejected(tmp_path, tiny):
    path = _write(tmp_path / "mmproj.gguf", tiny)
    bigger = tmp_path / "bigger.gguf"
    doubled = {
        "clip.vision.image_size": 2 * IMAGE_SIZE,
        "clip.vision.image_grid_pinpoints": [2 * side for pair in PINPOINTS for side in pair],
    }
    _copy_gguf(path, bigger, kv_overrides=doubled)
    _assert_model_error(bigger, "v.position_embd.weight")


def test_missing_tensor_is_rejected(tmp_path, tiny):
    state = {k: v for k, v in tiny.model.state_dict().items() if k != "encoder.layers.0.self_attn.q_proj.bias"}
    path = _write(tmp_path / "mmproj.gguf", tiny, clip_state=state)
    _assert_model_error(path, "missing", "v.blk.0.attn_q.bias")


def test_missing_newline_is_rejected(tmp_path, tiny):
    path = _write(tmp_path / "mmproj.gguf", tiny)
    no_newline = tmp_path / "llava15.gguf"
    _copy_gguf(path, no_newline, drop=("model.image_newline",))
    _assert_model_error(no_newline, "image_newline")


@pytest.mark.parametrize("projector_type", ["ldp", "resampler", "mlp_norm"])
def test_unsupported_projector_is_rejected(tmp_path, tiny, projector_type):
    path = _write(tmp_path / "mmproj.gguf", tiny, projector_type=projector_type)
    _assert_model_error(path, "unsupported projector", repr(projector_type))
