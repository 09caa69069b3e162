"""The settings of one training run, saved as ``RUN_DIR/train_config.json``.

``--resume`` and ``fila train export`` read them back, so a run is described by its directory.
"""

from __future__ import annotations

from dataclasses import dataclass

# Stage defaults, as the paper's peers (LLaVA-NeXT): stage 1 aligns (high lr, only the new
# modules), stage 2 fine-tunes (low lr, the LLM too).
STAGE_LEARNING_RATES = {1: 1e-3, 2: 2e-5}
# Share of the optimiser steps spent warming the learning rate up linearly, before the cosine.
DEFAULT_WARMUP_RATIO = 0.03
# Gradient clipping threshold (HF Trainer's and LLaVA's default).
DEFAULT_MAX_GRAD_NORM = 1.0
# LLaVA-NeXT's training context.
DEFAULT_MAX_LENGTH = 4096
DEFAULT_SAVE_EVERY = 500
CONFIG_FILE = "train_config.json"
# LLaVA-1.5/NeXT's LoRA recipe: rank 128, alpha 256, on every linear layer of the LLM.
DEFAULT_LORA_R = 128
DEFAULT_LORA_ALPHA = 256.0
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# llama.cpp quantisation type of the --full-llm export (the published bundles' type).
DEFAULT_QUANTIZATION = "Q4_K_M"


@dataclass
class TrainConfig:
    stage: int
    data: str
    images: str
    base: str
    out: str
    fusion_config: str | None = None  # FusionConfig JSON; None = the paper's
    convnext: str | None = None  # timm ConvNeXt safetensors to start the branch from
    init: str | None = None  # an earlier run to start from (stage 2 from stage 1)
    llm_gguf: str | None = None  # the base LLM as GGUF, named in the exported bundle.json
    lr: float | None = None  # None = the stage's default
    llm_lr: float | None = None  # stage 2: the LLM's group (None = lr)
    # CVFM's group (None = lr). The default keeps one learning rate per stage, the recipe of the
    # paper and of LLaVA-NeXT; a higher one helps a zero-initialised gate (tanh g) open when CVFM
    # starts from scratch next to modules that are already trained (benchmarks/fragmentation.py).
    fusion_lr: float | None = None
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    epochs: int = 1
    batch_size: int = 1  # samples per device per micro-step
    grad_accum: int = 1  # micro-steps per optimiser step
    max_steps: int | None = None
    seed: int = 0
    max_length: int = DEFAULT_MAX_LENGTH
    save_every: int = DEFAULT_SAVE_EVERY
    log_every: int = 1
    gradient_checkpointing: bool = True
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    weight_decay: float = 0.0
    train_convnext: bool = False
    # Stage 2: train the whole LLM instead of a LoRA on it; export a GGUF of it, quantised.
    full_llm: bool = False
    lora_r: int = DEFAULT_LORA_R
    lora_alpha: float = DEFAULT_LORA_ALPHA
    quantization: str = DEFAULT_QUANTIZATION
    device: str = "auto"
    # From-scratch experiments (benchmarks/fragmentation.py trains a tiny model on generated pages);
    # the paper's recipe, and the CLI, leave all three as they are.
    train_vit: bool = False  # train the ViT too (the paper keeps it frozen in both stages)
    fusion: bool = True  # False: the anyres-only LLaVA-NeXT baseline (no ConvNeXt, no CVFM)
    # Write the bundle when the run ends. False keeps the trained model in TrainResult.model only
    # (checkpoints are still written): what a trained ViT or a run without fusion needs, as a
    # bundle has no slot for either.
    export: bool = True
    # Write RUN_DIR/base/ when the run ends: the trained ViT, projector and LLM as an HF LLaVA-NeXT
    # checkpoint (the base's other tensors, config and tokenizer copied), which --base reads.
    save_base: bool = False
    # Render every page once, before training, into memory as uint8 tensors, instead of reading
    # and resizing each page at every step: for data sets whose pages fit in memory.
    cache_pages: bool = False

    def __post_init__(self) -> None:
        if self.stage not in STAGE_LEARNING_RATES:
            raise ValueError(f"--stage must be 1 or 2, got {self.stage}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.full_llm and self.stage != 2:
            raise ValueError("--full-llm is a stage 2 option (stage 1 keeps the LLM frozen)")
        if self.full_llm and self.llm_gguf is None and self.export:
            raise ValueError("--full-llm needs --llm-gguf, the base model's GGUF: its tokenizer and settings go into the export")
        if self.export and self.train_vit:
            raise ValueError("train_vit needs export=False: a bundle takes its ViT from --base, so a trained one would be lost")
        if self.export and not self.fusion:
            raise ValueError("fusion=False needs export=False: a bundle's trained weights are fusion weights, which need a CVFM")
        if not self.fusion and (self.fusion_config or self.convnext or self.train_convnext or self.init):
            raise ValueError("fusion=False (anyres only) takes no fusion config, ConvNeXt, ConvNeXt training or --init")
        if self.fusion_lr is not None and not self.fusion:
            raise ValueError("--fusion-lr is CVFM's learning rate; an anyres-only run (fusion=False) has no CVFM")
        for name in ("lr", "llm_lr", "fusion_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive (got {value})")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("--warmup-ratio must be in [0, 1)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else STAGE_LEARNING_RATES[self.stage]

    def group_learning_rate(self, group: str) -> float:
        """The peak learning rate of one parameter group, by fila_cli.train.model's group names
        (spelt out here: this module is read without importing torch)."""
        if group == "llm" and self.llm_lr is not None:
            return self.llm_lr
        if group == "cvfm" and self.fusion_lr is not None:
            return self.fusion_lr
        return self.learning_rate
