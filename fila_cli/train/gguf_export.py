"""The trained LLM for llama.cpp: a GGUF LoRA adapter (stage 2 with LoRA) or a whole GGUF
(``--full-llm``), written with ``gguf``'s writer.

Names follow llama.cpp's converter (``convert_hf_to_gguf.py``): ``model.layers.3.self_attn.q_proj``
becomes ``blk.3.attn_q``. For llama-architecture models (Llama, Mistral, Vicuna) the converter
permutes the rows of q and k from HF's rotate-half rope layout to llama.cpp's interleaved one; the
same permutation applies to whatever produces q/k rows: the base weights and a LoRA's ``lora_b``.
Qwen2 uses NEOX rope in llama.cpp and is not permuted.

A LoRA adapter GGUF holds ``<base tensor name>.lora_a`` [r, in] and ``.lora_b`` [out, r] per adapted
matrix, with ``general.type = adapter``, ``adapter.type = lora`` and ``adapter.lora.alpha``; llama.cpp
scales ``B A`` by alpha / r, as peft does.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from fila_cli.atomic_files import atomic_path
from fila_cli.errors import ModelError

# HF model_type -> llama.cpp architecture, and whether q/k rows are permuted for rope.
GGUF_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
# Per-layer module names, HF -> llama.cpp.
_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
LORA_A_SUFFIX, LORA_B_SUFFIX = ".lora_a", ".lora_b"
ADAPTER_FILE = "llm-lora.gguf"


def architecture_of(text_config) -> tuple[str, bool]:
    model_type = getattr(text_config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ModelError(f"exporting a {model_type!r} language model to GGUF is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}")
    return GGUF_ARCHITECTURES[model_type]


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    match = _LAYER_RE.match(hf_name)
    if match:
        layer, module, kind = match.groups()
        if module in _LAYER_TENSORS:
            return f"blk.{layer}.{_LAYER_TENSORS[module]}.{kind}"
    module, _, kind = hf_name.rpartition(".")
    if module in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[module]}.{kind}"
    raise ModelError(f"no llama.cpp name for the language model tensor {hf_name}")


def permute_rope_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half -> llama.cpp interleaved order of the output rows (convert_hf_to_gguf's permute)."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rope_heads(gguf_tensor: str, text_config) -> int | None:
    """Heads to permute by for q/k tensors of a permuted architecture, else None."""
    if ".attn_q." in gguf_tensor:
        return text_config.num_attention_heads
    if ".attn_k." in gguf_tensor:
        return getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    return None


def llm_tensors(state: dict[str, torch.Tensor], text_config) -> dict[str, np.ndarray]:
    """A causal LM's state dict -> llama.cpp tensors (float32 numpy), q/k permuted where llama.cpp wants."""
    _, permuted = architecture_of(text_config)
    tensors = {}
    for name, tensor in state.items():
        target = gguf_name(name)
        array = tensor.detach().float().cpu().numpy()
        heads = _rope_heads(target, text_config) if permuted else None
        tensors[target] = permute_rope_rows(array, heads) if heads else array
    if "output.weight" not in tensors and getattr(text_config, "tie_word_embeddings", False):
        tensors["output.weight"] = tensors["token_embd.weight"]
    return tensors


def lora_tensors(peft_model, text_config) -> tuple[dict[str, np.ndarray], float]:
    """(llama.cpp adapter tensors, alpha) from a peft LoRA model of a causal LM."""
    from peft.tuners.lora import LoraLayer

    _, permuted = architecture_of(text_config)
    tensors: dict[str, np.ndarray] = {}
    alphas = set()
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        hf_name = module_name.removeprefix("base_model.model.") + ".weight"
        target = gguf_name(hf_name)
        lora_a = module.lora_A["default"].weight.detach().float().cpu().numpy()  # [r, in]
        lora_b = module.lora_B["default"].weight.detach().float().cpu().numpy()  # [out, r]
        heads = _rope_heads(target, text_config) if permuted else None
        tensors[target + LORA_A_SUFFIX] = lora_a
        tensors[target + LORA_B_SUFFIX] = permute_rope_rows(lora_b, heads) if heads else lora_b
        # peft's scaling is alpha / r; llama.cpp computes alpha / r from the stored alpha.
        alphas.add(module.scaling["default"] * lora_a.shape[0])
    if not tensors:
        raise ModelError("the language model has no LoRA layers to export")
    if len(alphas) != 1:
        raise ModelError(f"LoRA layers use different alpha/r ({sorted(alphas)}); one adapter alpha is required")
    return tensors, alphas.pop()


def write_lora_adapter(path: Path, peft_model, text_config) -> Path:
    from gguf import GGUFType, GGUFWriter, Keys

    tensors, alpha = lora_tensors(peft_model, text_config)
    arch, _ = architecture_of(text_config)
    with atomic_path(path) as partial:
        writer = GGUFWriter(str(partial), arch)
        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, array in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        _write_out(writer)
    return path


# Metadata a whole-LLM export does not copy from the base GGUF: the writer's own header fields,
# and the ones that describe the new file rather than the model.
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version")
FULL_LLM_F16_FILE = "llm-f16.gguf"
# ``gguf`` file types (llama_ftype) of an unquantised export.
_FTYPE_MOSTLY_F16 = 1


def full_llm_file(quantization: str) -> str:
    return f"llm-{quantization.lower()}.gguf"


def quantization_ftype(name: str) -> int:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}", None)
    if ftype is None:
        raise ModelError(f"unknown llama.cpp quantisation {name!r}; use e.g. Q4_K_M, Q5_K_M, Q8_0 or F16")
    return int(ftype)


def write_full_llm(run_dir: Path, llm, metadata_from: Path, quantization: str) -> Path:
    """The trained LLM as an f16 GGUF (``gguf``'s writer, tokenizer and settings copied from the base
    GGUF), then quantised by llama.cpp's own quantiser. Returns the quantised file."""
    f16 = _write_f16(run_dir / FULL_LLM_F16_FILE, llm, metadata_from)
    if quantization.upper() == "F16":
        return f16
    return quantize(f16, run_dir / full_llm_file(quantization), quantization)


def _write_f16(path: Path, llm, metadata_from: Path) -> Path:
    from gguf import GGUFValueType, GGUFWriter

    from fila_cli.gguf_files import open_gguf

    config = llm.config
    arch, _ = architecture_of(config)
    reader = open_gguf(Path(metadata_from), "base LLM GGUF (--llm-gguf)", "pass the base model's GGUF as --llm-gguf")
    base_arch = reader.get_field("general.architecture").contents()
    if base_arch != arch:
        raise ModelError(f"{metadata_from}: a {base_arch} GGUF, but the trained LLM is {arch}; pass the base model's GGUF as --llm-gguf")
    tensors = llm_tensors(llm.state_dict(), config)
    base_shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    for name, array in tensors.items():
        if name in base_shapes and base_shapes[name] != array.shape:
            raise ModelError(f"{metadata_from}: tensor {name} is {base_shapes[name]} there, {array.shape} in the trained LLM; --llm-gguf is another model")
    with atomic_path(path) as partial:  # a crash never leaves half a file at ``path``
        writer = GGUFWriter(str(partial), arch)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in _NOT_COPIED:
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        writer.add_file_type(_FTYPE_MOSTLY_F16)
        for name, array in tensors.items():
            # Matrices in f16, norms and biases in f32, as llama.cpp's converter writes an f16 model.
            writer.add_tensor(name, array.astype(np.float16 if array.ndim == 2 else np.float32))
        _write_out(writer)
    return path


def _write_out(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(source: Path, target: Path, quantization: str) -> Path:
    """llama.cpp's quantiser (``llama_model_quantize``) through llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quantization_ftype(quantization)
    with atomic_path(target) as partial:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if status != 0:
            raise ModelError(f"{source}: llama.cpp could not quantise it to {quantization} (status {status})")
    return target
