"""The checkpoint training starts from: an HF LLaVA-NeXT directory (``--base``), and a trained
model written back as one (``save_base_checkpoint``, ``--save-base``), so a later run starts from it.

Its vision tower, projector and image_newline are read by the vision loader the rest of fila uses;
its language model becomes a plain transformers causal LM (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``...), the model the GGUF was converted from, so that LoRA
and export work on the names llama.cpp's converter knows. Both tensor layouts are read: the hub's
(``language_model.model.*``, ``language_model.lm_head.*``) and transformers 5's
(``model.language_model.*``, ``lm_head.*``, also without the leading ``model.``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fila_cli.errors import ModelError
from fila_cli.vision.loaders.hf_safetensors import classify_key

# Where --save-base writes the trained base inside the run directory.
BASE_DIR = "base"
_WEIGHTS_FILE = "model.safetensors"
# Files of the source checkpoint not copied: its weights, written anew as one file.
_NOT_COPIED = ("model.safetensors.index.json",)
# Prefix in the checkpoint's vision part -> prefix in HybridEncoder's state dict.
_VISION_PARTS = {"clip": "vit.", "projector": "projector.", "newline": "image_newline"}

# Checkpoint prefix -> prefix in a causal LM's own state dict.
_LLM_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("language_model.", "model."),  # transformers 5's names without the leading "model."
    ("lm_head.", "lm_head."),
)


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no .safetensors files; --base must be an HF LLaVA-NeXT checkpoint directory")
    return files


def read_base_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise ModelError(f"{path}: not an HF checkpoint directory (no config.json); --base must be a LLaVA-NeXT checkpoint such as llava-hf/llava-v1.6-mistral-7b-hf")
    config = json.loads(config_file.read_text())
    if "text_config" not in config or "vision_config" not in config:
        raise ModelError(f"{config_file}: not a LLaVA-NeXT config (no text_config/vision_config)")
    return config


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot load its tokenizer ({error}); the base checkpoint must ship tokenizer.json") from None
    if not tokenizer.chat_template:
        template_file = path / "chat_template.json"
        if template_file.is_file():  # processors store the template beside the tokenizer
            tokenizer.chat_template = json.loads(template_file.read_text()).get("chat_template")
    if not tokenizer.chat_template:
        raise ModelError(f"{path}: its tokenizer has no chat_template; training renders conversations with it")
    return tokenizer


def llm_state_from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    for prefix, own in _LLM_PREFIXES:
                        if key.startswith(prefix):
                            state[own + key[len(prefix) :]] = handle.get_tensor(key)
                            break
        except (SafetensorError, OSError) as error:
            raise ModelError(f"{file}: not a readable safetensors file ({error})") from None
    return state


def load_llm(path: Path, dtype: torch.dtype = torch.float32):
    """The base checkpoint's language model as a transformers causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path)).text_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = llm_state_from_checkpoint(path)
    if not state:
        raise ModelError(f"{path}: holds no language model tensors (language_model.* or model.language_model.*)")
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing:
        raise ModelError(f"{path}: language model tensor {missing[0]} is missing ({len(missing)} in all)")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _llm_state(llm) -> dict[str, torch.Tensor]:
    """The LLM's weights by the causal LM's own names; a peft LoRA merged into copies of them."""
    if not hasattr(llm, "merge_adapter"):
        return dict(llm.state_dict())
    llm.merge_adapter()
    try:
        return {key.replace(".base_layer", ""): value.detach().clone()
                for key, value in llm.get_base_model().state_dict().items() if "lora_" not in key}
    finally:
        llm.unmerge_adapter()


def _own_name(key: str) -> tuple[str, str] | None:
    """A checkpoint key -> ("llm" | "vision", the name in the LLM's or the encoder's state dict)."""
    where = classify_key(key)
    if where is not None:
        part, name = where
        return "vision", _VISION_PARTS[part] + name
    for prefix, own in _LLM_PREFIXES:
        if key.startswith(prefix):
            return "llm", own + key[len(prefix) :]
    return None


def save_base_checkpoint(encoder, llm, source: Path, out: Path) -> Path:
    """Write ``source`` (an HF LLaVA-NeXT checkpoint) to ``out`` with the tensors that ``encoder``
    (a HybridEncoder) and ``llm`` hold replaced by theirs: the same names, dtypes and files besides
    (config, tokenizer, chat template), so it loads wherever ``source`` does. The ViT layers past
    the feature layer, which the encoder does not hold, are the source's. Fusion weights are not
    part of a LLaVA-NeXT checkpoint (a run exports them as fusion.safetensors)."""
    ours = {"vision": {k: v for k, v in encoder.state_dict().items() if not k.startswith(("cvfm.", "convnext."))},
            "llm": _llm_state(llm)}
    written: set[tuple[str, str]] = set()
    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(source):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                own = _own_name(key)
                if own is not None and own[1] in ours[own[0]]:
                    tensor = ours[own[0]][own[1]].detach().to("cpu", tensor.dtype).contiguous()
                    written.add(own)
                state[key] = tensor
    tied = {("llm", "lm_head.weight")} if getattr(getattr(llm, "config", None), "tie_word_embeddings", False) else set()
    unwritten = sorted({(part, name) for part, names in ours.items() for name in names} - written - tied)
    if unwritten:
        raise ModelError(f"{source}: has no tensor for the trained {unwritten[0][1]} ({len(unwritten)} in all); cannot write the base back")
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in _NOT_COPIED:
            shutil.copy2(path, out / path.name)
    save_file(state, str(out / _WEIGHTS_FILE), metadata={"format": "pt"})
    return out
