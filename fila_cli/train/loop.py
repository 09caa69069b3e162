"""The training loop: AdamW over the stage's parameter groups, linear warm-up then cosine decay,
gradient accumulation, data parallelism (``torchrun`` / ``accelerate launch``), checkpoints and
exact resumption.

Determinism: the data order of epoch e is a permutation seeded by ``seed + e``, the torch RNG is
reseeded from ``seed`` and the step before each step, and the learning rate is a function of the
step. A resumed run therefore computes exactly what the uninterrupted run would have. The loss of a
step is the summed cross-entropy of the global batch divided by its number of label tokens,
whatever the number of devices or micro-steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fila_cli.config import from_dict
from fila_cli.errors import UsageError
from fila_cli.train.build import build_model
from fila_cli.train.chat import ChatRenderer
from fila_cli.train.checkpoint import latest_checkpoint, load_checkpoint, restore_trainable, save_checkpoint
from fila_cli.train.config import CONFIG_FILE, TrainConfig
from fila_cli.train.export import export_run
from fila_cli.train.model import LLM_GROUP, TrainModel
from fila_cli.train.prepare import PreparedData, load_sample_image, prepare_data
from fila_cli.train.report import append_metrics, plot_loss, truncate_metrics

# Mixes the step into the per-step seed (a large prime keeps (seed, step) pairs apart).
_STEP_SEED_STRIDE = 1_000_003
_BYTES_FP32 = 4
# AdamW keeps two fp32 moments per trainable parameter, plus its fp32 gradient.
_OPTIMIZER_BYTES_PER_TRAINABLE = 3 * _BYTES_FP32


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    skipped: int
    seconds_per_step: float | None
    samples_per_second: float | None
    model: TrainModel | None = None  # the trained model, for callers that go on using it


class Callbacks:
    """What the loop tells its caller (the CLI draws a progress bar, tests stay quiet)."""

    def warn(self, message: str) -> None: ...
    def preparing(self, done: int, total: int) -> None: ...
    def started(self, total_steps: int, start_step: int) -> None: ...
    def step(self, record: dict) -> None: ...
    def finished(self) -> None: ...


def setup_distributed(device_name: str) -> Distributed:
    """torchrun and accelerate launch both set WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}") if device_name == "cuda" else torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world=world, device=device)


def autocast_context(device: torch.device):
    """bf16 autocast where the GPU supports it; full fp32 elsewhere (CPU autocast is slow and lossy)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def frozen_llm_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The LLM's weights in bf16 on GPUs when they do not train (stage 1) or train through a LoRA
    (whose own weights peft keeps in fp32): half the memory of a 7B model. fp32 otherwise."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 and not config.full_llm else torch.float32


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the learning rate at 0-based optimiser step ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def save_config(config: TrainConfig, run_dir: Path) -> None:
    (run_dir / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")


def load_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a training run (no {CONFIG_FILE}); pass the --out of an earlier fila train")
    return from_dict(TrainConfig, json.loads(path.read_text()))


def make_optimizer(model: TrainModel, config: TrainConfig) -> torch.optim.AdamW:
    groups = []
    for name, params in sorted(model.trainable_by_group().items()):
        lr = config.llm_lr if name == LLM_GROUP and config.llm_lr is not None else config.learning_rate
        groups.append({"params": [p for _, p in params], "lr": lr, "initial_lr": lr, "name": name})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def trainable_named(model: TrainModel) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def dry_run_report(model: TrainModel) -> dict:
    """Trainable parameters per group and a memory estimate (weights + gradients + AdamW moments;
    activations come on top and depend on the sequence length)."""
    groups = {name: sum(p.numel() for _, p in params) for name, params in model.trainable_by_group().items()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(groups.values())
    return {
        "trainable_parameters": groups,
        "trainable_total": trainable,
        "frozen_total": sum(p.numel() for p in model.parameters()) - trainable,
        "memory_estimate_bytes": weights + trainable * _OPTIMIZER_BYTES_PER_TRAINABLE,
    }


def train(config: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          callbacks: Callbacks | None = None) -> TrainResult:
    """Run (or resume) training into ``config.out``; ``stop_after`` steps of the planned schedule
    then stop as if interrupted (a later ``resume`` goes on)."""
    run_dir = Path(config.out)
    env = setup_distributed(config.device)
    # Only the first process reports: one progress bar, one set of warnings.
    callbacks = (callbacks or Callbacks()) if env.is_main else Callbacks()
    if not resume and (run_dir / CONFIG_FILE).exists():
        raise UsageError(f"{run_dir} already holds a run; pass --resume to go on with it, or another --out")
    if env.world > 1:
        dist.barrier()  # every process has checked before the first one writes
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config, llm_dtype=frozen_llm_dtype(config, env.device))
    model.to(env.device)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    data = prepare_data(Path(config.data), Path(config.images), ChatRenderer(tokenizer), model.vision, config.max_length,
                        warn=callbacks.warn, on_progress=callbacks.preparing)
    global_batch = config.batch_size * config.grad_accum * env.world
    steps_per_epoch = len(data.samples) // global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"{config.data}: {len(data.samples)} usable samples ({data.n_skipped} skipped), fewer than one global batch of {global_batch}")
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = math.ceil(config.warmup_ratio * total)

    optimizer = make_optimizer(model, config)
    named = trainable_named(model)
    start = 0
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(config, run_dir)
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            start = load_checkpoint(checkpoint, named, optimizer)["step"]
        if env.is_main:
            truncate_metrics(run_dir, start)
    engine = model
    if env.world > 1:
        engine = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    callbacks.started(total, start)
    end = total if stop_after is None else min(total, start + stop_after)
    last_loss, started_at, timed_steps, timed_samples = None, None, 0, 0
    for step in range(start, end):
        step_started = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        order = epoch_order(len(data.samples), config.seed, epoch)
        batch = [data.samples[i] for i in order[position * global_batch : (position + 1) * global_batch]]
        loss = run_step(engine, model, optimizer, batch, step, total, warmup, config, env)
        last_loss = loss
        elapsed = time.perf_counter() - step_started
        if step > start:  # the first step pays for warm-up; time the rest
            timed_steps, timed_samples = timed_steps + 1, timed_samples + global_batch
            started_at = started_at or step_started
        record = {
            "step": step + 1, "epoch": epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
            "tokens_per_s": sum(s.length for s in batch) / elapsed, "samples_per_s": global_batch / elapsed,
            "step_s": elapsed, "skipped": data.n_skipped,
        }
        if env.is_main and ((step + 1) % config.log_every == 0 or step + 1 == total):
            append_metrics(run_dir, record)
        callbacks.step(record)
        if env.is_main and ((step + 1) % config.save_every == 0 or step + 1 == end):
            save_checkpoint(run_dir, step + 1, named, optimizer, {"skipped": dict(data.skipped), "total_steps": total})
    if env.is_main and end == total and config.export:
        export_run(run_dir, config, model.vision, model.llm)
    if env.is_main:
        plot_loss(run_dir)
    callbacks.finished()
    if env.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    wall = time.perf_counter() - started_at if started_at else None
    return TrainResult(run_dir, end, last_loss, data.n_skipped,
                       wall / timed_steps if wall and timed_steps else None,
                       timed_samples / wall if wall and timed_steps else None, model)


def run_step(engine, model: TrainModel, optimizer, batch, step: int, total: int, warmup: int, config: TrainConfig, env: Distributed) -> float:
    """One optimiser step over the global ``batch``; returns its mean loss per label token."""
    torch.manual_seed(config.seed * _STEP_SEED_STRIDE + step)
    n_labels = sum(sample.tokens.n_label_tokens for sample in batch)
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(config.grad_accum):
        first = (micro * env.world + env.rank) * config.batch_size
        mine = batch[first : first + config.batch_size]
        images = [load_sample_image(sample, model.vision) for sample in mine]
        last = micro == config.grad_accum - 1
        sync = contextlib.nullcontext() if last or env.world == 1 else engine.no_sync()
        with sync:
            with autocast_context(env.device):
                loss = engine(mine, images)
            # DDP averages gradients over processes; scaling by world makes it the global sum.
            (loss * env.world / n_labels).backward()
        loss_sum += loss.detach()
    if env.world > 1:
        dist.all_reduce(loss_sum)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    factor = lr_factor(step, total, warmup)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (loss_sum / n_labels).item()


def export_checkpoint(run_dir: Path, checkpoint: Path | None = None) -> list[Path]:
    """Redo a run's export from a checkpoint (the latest by default)."""
    config = load_config(run_dir)
    if not config.export:
        raise UsageError(f"{run_dir}: trained with export=False (a trained ViT or no fusion), which a bundle cannot hold")
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UsageError(f"{run_dir}: has no checkpoints to export; train first")
    # Frozen parts that were randomly initialised (a ConvNeXt without --convnext) are not in the
    # checkpoint: build them from the run's seed exactly as train() did.
    torch.manual_seed(config.seed)
    model, _ = build_model(config)
    restore_trainable(checkpoint, trainable_named(model), "it belongs to another run")
    return export_run(run_dir, config, model.vision, model.llm)


def dry_run(config: TrainConfig) -> dict:
    model, _ = build_model(config)
    return dry_run_report(model)
