"""Building the model a run trains, from ``--base`` (and ``--init``, ``--fusion-config``, ``--convnext``)."""

from __future__ import annotations

from pathlib import Path

import torch

from fila_cli.config import FusionConfig, load_json
from fila_cli.errors import ModelError, UsageError
from fila_cli.train.base import load_llm, load_tokenizer, read_base_config
from fila_cli.train.config import LORA_TARGET_MODULES, TrainConfig
from fila_cli.train.export import FUSION_FILE
from fila_cli.train.model import CONVNEXT_GROUP, FUSION_GROUP, LLM_GROUP, PROJECTOR_GROUP, VIT_GROUP, TrainModel
from fila_cli.vision.load import build_encoder
from fila_cli.vision.loaders.hf_safetensors import load_hf_vision


def fusion_config_for(config: TrainConfig) -> FusionConfig | None:
    """The run's FusionConfig; None for an anyres-only run (``fusion=False``)."""
    if not config.fusion:
        return None
    if config.fusion_config is None:
        return FusionConfig()  # the paper's
    path = Path(config.fusion_config)
    if not path.is_file():
        raise UsageError(f"{path}: no such fusion config; pass --fusion-config a FusionConfig JSON file")
    try:
        return load_json(FusionConfig, path)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{path}: not a valid fusion config ({error})") from None


def trainable_groups(config: TrainConfig) -> set[str]:
    """Stage 1: CVFM and projector. Stage 2: those and the LLM (and the ConvNeXt, the ViT if asked).
    An anyres-only run (``fusion=False``) has no CVFM."""
    groups = {FUSION_GROUP, PROJECTOR_GROUP} if config.fusion else {PROJECTOR_GROUP}
    if config.train_vit:
        groups.add(VIT_GROUP)
    if config.stage == 2:
        groups.add(LLM_GROUP)
    if config.train_convnext:
        groups.add(CONVNEXT_GROUP)
    return groups


def build_model(config: TrainConfig, llm_dtype: torch.dtype = torch.float32) -> tuple[TrainModel, object]:
    """(the model with the stage's parameters trainable, the tokenizer)."""
    base = Path(config.base)
    read_base_config(base)
    vision = load_hf_vision(base)
    init_fusion = None
    if config.init is not None:
        init_fusion = Path(config.init) / FUSION_FILE
        if not init_fusion.is_file():
            raise UsageError(f"{config.init}: --init must be an earlier run's directory, holding {FUSION_FILE}")
    encoder = build_encoder(vision, fusion_path=init_fusion, fusion_config=fusion_config_for(config))
    if config.convnext is not None and init_fusion is None:
        try:
            encoder.convnext.load_timm_weights(config.convnext)
        except (OSError, KeyError, RuntimeError) as error:
            raise ModelError(f"{config.convnext}: cannot load it into the ConvNeXt branch ({error})") from None
    llm = load_llm(base, dtype=llm_dtype)
    if llm.get_input_embeddings().weight.shape[1] != encoder.llm_width:
        raise ModelError(f"{base}: the projector outputs {encoder.llm_width} wide tokens, the LLM embeds {llm.get_input_embeddings().weight.shape[1]}")
    lora = config.stage == 2 and not config.full_llm
    if lora:
        llm = add_lora(llm, config)
    model = TrainModel(encoder, llm)
    model.set_trainable(trainable_groups(config), lora=lora)
    return model, load_tokenizer(base)


def add_lora(llm, config: TrainConfig):
    """The LLM with peft LoRA layers on every linear layer (B zero-initialised: the start is the base)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(LORA_TARGET_MODULES))
    return get_peft_model(llm, lora)
