"""Training speed: seconds per step, samples/s, tokens/s, peak memory and MFU of fila train's step.

Builds the model from configs with random weights (the cost does not depend on the values) and
runs the real training step (``fila_cli.train.loop.run_step``: rendering, anyres, Hybrid Encoder,
packing, LLM forward/backward, AdamW) on synthetic one-turn samples over page images:

- ``--size full``: ViT-L/14-336, ConvNeXt-L (the paper's FusionConfig), a Mistral-7B-shaped LLM in
  bf16 (frozen weights; LoRA / CVFM / projector in fp32 under bf16 autocast). Needs a large GPU.
- ``--size tiny``: the test suite's tiny model (56-pixel crops, 64-wide 2-layer LLM): a CPU smoke figure.

MFU = FLOPs of one step (counted by torch's FlopCounterMode, forward + backward, recomputation
included) / (seconds per step x the device's peak dense bf16 rate). The peak is a named constant
for the H100 SXM; elsewhere MFU is left out and the achieved rate printed instead.

Usage: python benchmarks/train.py [--size tiny|full] [--stage 1|2] [--steps N] [--batch-size B]
       [--no-gradient-checkpointing] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, CLIPVisionConfig, MistralConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fila_cli, tests.helpers

from fila_cli.config import AnyresConfig, FusionConfig
from fila_cli.train.build import add_lora, trainable_groups
from fila_cli.train.chat import IGNORE_INDEX, TokenizedConversation
from fila_cli.train.config import TrainConfig
from fila_cli.train.data import Conversation, ImageRef
from fila_cli.train.loop import make_accelerator, make_optimizer, run_step
from fila_cli.train.model import PreparedSample, TrainModel
from fila_cli.vision.anyres import preprocess
from fila_cli.vision.model.encoder import HybridEncoder

# NVIDIA H100 SXM dense bf16 tensor-core peak (the datasheet's 1979 TFLOP/s is with sparsity).
H100_BF16_PEAK_FLOPS = 989e12
# A synthetic sample: a prompt before/after the image and an answer, in tokens.
PROMPT_BEFORE, PROMPT_AFTER, ANSWER = 40, 20, 40
# An A4 page at 150 dpi: the 672x336-canvas case LLaVA-NeXT documents mostly hit.
PAGE_SIZE = (1754, 1240)


def full_size(stage: int, device: torch.device) -> tuple[HybridEncoder, torch.nn.Module]:
    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
    encoder = HybridEncoder(clip, 23, 4096, AnyresConfig(), FusionConfig())
    llm_config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=torch.bfloat16)
    return encoder, llm


def tiny_size(stage: int, device: torch.device) -> tuple[HybridEncoder, torch.nn.Module]:
    from tests.helpers.tiny_train import TRAIN_CROP_SIZE, text_config
    from tests.helpers.tiny_vision import tiny_clip_config, tiny_fusion_config

    clip = tiny_clip_config()
    clip.image_size = TRAIN_CROP_SIZE
    pinpoints = [[h * TRAIN_CROP_SIZE // 336, w * TRAIN_CROP_SIZE // 336] for h, w in AnyresConfig().image_grid_pinpoints]
    encoder = HybridEncoder(clip, 2, 64, AnyresConfig(crop_size=TRAIN_CROP_SIZE, image_grid_pinpoints=pinpoints), tiny_fusion_config())
    return encoder, AutoModelForCausalLM.from_config(text_config("llama", 64))


def synthetic_batch(encoder: HybridEncoder, n: int, vocab: int, folder: Path) -> list[PreparedSample]:
    from tests.helpers.tiny_vision import page_image

    path = folder / "page.png"
    page_image(*PAGE_SIZE).save(path)
    geometry = preprocess(page_image(*PAGE_SIZE), encoder.anyres).geometry
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in range(n):
        ids = torch.randint(3, vocab, (PROMPT_BEFORE + PROMPT_AFTER + ANSWER,), generator=generator).tolist()
        after = ids[PROMPT_BEFORE:]
        tokens = TokenizedConversation(ids[:PROMPT_BEFORE], [IGNORE_INDEX] * PROMPT_BEFORE, after,
                                       [IGNORE_INDEX] * PROMPT_AFTER + after[PROMPT_AFTER:])
        conversation = Conversation(str(index), ImageRef(path, 1), (("user", "<image>"), ("assistant", "x")))
        samples.append(PreparedSample(index, conversation, tokens, encoder.count_tokens(geometry)))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    torch.manual_seed(0)
    encoder, llm = (full_size if args.size == "full" else tiny_size)(args.stage, device)
    config = TrainConfig(stage=args.stage, data="-", images="-", base="-", out="-", batch_size=args.batch_size,
                         lora_r=128 if args.size == "full" else 8, gradient_checkpointing=not args.no_gradient_checkpointing)
    if args.stage == 2:
        llm = add_lora(llm, config)
    model = TrainModel(encoder.to(device), llm)
    model.set_trainable(trainable_groups(config), lora=args.stage == 2)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = make_optimizer(model, config)
    accelerator = make_accelerator(args.device)
    with tempfile.TemporaryDirectory() as folder:
        batch = synthetic_batch(model.vision, args.batch_size, llm.config.vocab_size, Path(folder))
        step = lambda i: run_step(accelerator, model, model, optimizer, batch, i, args.steps + 2, 1, config)  # noqa: E731
        step(0)  # warm-up: kernels, allocator
        counter = FlopCounterMode(display=False)
        with counter:
            step(1)
        flops = counter.get_total_flops()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for i in range(args.steps):
            step(2 + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
    tokens = sum(s.length for s in batch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    # Linux reports the peak resident set in KiB: the whole process (Python, torch, the data), not only tensors.
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    is_h100 = device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)
    rows = [
        ("size / stage", f"{args.size} / {args.stage}{' (LoRA)' if args.stage == 2 else ''}"),
        ("device", torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"),
        ("batch (samples/step)", f"{args.batch_size}, gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}"),
        ("tokens per sample", f"{batch[0].length} ({batch[0].n_visual} visual)"),
        ("trainable parameters", f"{trainable:,}"),
        ("s / step", f"{seconds:.3f}"),
        ("samples / s", f"{args.batch_size / seconds:.2f}"),
        ("tokens / s", f"{tokens / seconds:.0f}"),
        ("GFLOP / step", f"{flops / 1e9:.2f}"),
        ("achieved GFLOP/s", f"{flops / seconds / 1e9:.1f}"),
        ("MFU (bf16 dense peak)", f"{flops / seconds / H100_BF16_PEAK_FLOPS:.1%}" if is_h100 else "n/a (not an H100)"),
        ("peak GPU memory", f"{peak:.1f} GiB" if peak is not None else "n/a"),
        ("peak RSS (process)", f"{peak_rss:.2f} GiB (before the model: {rss_start:.2f} GiB)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
