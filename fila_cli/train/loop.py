"""The training loop: AdamW over the stage's parameter groups, linear warm-up then cosine decay,
gradient accumulation, data parallelism, checkpoints and exact resumption.

Parallelism is accelerate's: an ``Accelerator`` reads what the launcher set up (``torchrun`` or
``accelerate launch --config_file``: DDP, FSDP, the mixed precision) and wraps the model. The loop
is the same in one process, under DDP and under FSDP; checkpoints gather the full trainable weights
and optimiser state through ``torch.distributed.checkpoint.state_dict`` whatever the wrapping, so
they read the same whichever wrapping wrote them.

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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from fila_cli.config import from_dict
from fila_cli.errors import UsageError
from fila_cli.train.base import BASE_DIR, save_base_checkpoint
from fila_cli.train.build import build_model
from fila_cli.train.chat import ChatRenderer
from fila_cli.train.checkpoint import latest_checkpoint, read_checkpoint, restore_trainable, save_checkpoint
from fila_cli.train.config import CONFIG_FILE, TrainConfig
from fila_cli.train.data import BadSample, read_records
from fila_cli.train.export import export_run
from fila_cli.train.memory import OPTIMIZER_BYTES_PER_TRAINABLE, estimate_activations, llm_shape, vit_shape
from fila_cli.train.model import LLM_GROUP, TrainModel, group_of
from fila_cli.train.prepare import load_sample_image, prepare_data, prepare_sample, render_pages
from fila_cli.train.report import append_metrics, plot_loss, truncate_metrics
from fila_cli.vision.anyres import RenderedPage

# Mixes the step into the per-step seed (a large prime keeps (seed, step) pairs apart).
_STEP_SEED_STRIDE = 1_000_003
# Samples of --data a dry run reads to find the longest sequence.
DRY_RUN_SAMPLES = 64


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    skipped: int
    seconds_per_step: float | None
    samples_per_second: float | None
    model: TrainModel | None = None  # the trained model, for callers that go on using it (not under FSDP)
    parallelism: str = "none"  # accelerate's distributed type: NO, MULTI_CPU, MULTI_GPU (DDP), FSDP
    processes: int = 1
    is_main: bool = True  # the first process: the one that reports


class Callbacks:
    """What the loop tells its caller (the CLI draws a progress bar, tests stay quiet)."""

    def warn(self, message: str) -> None: ...
    def preparing(self, done: int, total: int) -> None: ...
    def started(self, total_steps: int, start_step: int) -> None: ...
    def step(self, record: dict) -> None: ...
    def finished(self) -> None: ...


def make_accelerator(device_name: str):
    """The launcher's Accelerator: one process, or the DDP / FSDP / mixed precision that ``torchrun``
    or ``accelerate launch --config_file`` set in the environment. ``device_name`` cpu (or auto
    without a GPU) selects gloo; bf16 autocast is the default on GPUs that have it."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UsageError("the accelerate config asks for DeepSpeed, which fila train does not drive (its engine steps the "
                         "optimiser itself and saves it as pickles); for a sharded run use examples/accelerate/fsdp.yaml")
    cpu = device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available())
    # The launcher's config chooses the precision when it names one; else bf16 where it is fast.
    # CPU autocast is slow and lossy: fp32 there.
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    default = "bf16" if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(cpu=cpu, mixed_precision=None if launcher_precision else default)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate selects FSDP on accelerators only; training on unsharded would not be what was asked.
        raise UsageError(f"the accelerate config asks for FSDP, which accelerate runs on GPUs only (here: "
                         f"{accelerator.device.type}); use examples/accelerate/ddp.yaml, or run on GPUs")
    return accelerator


def shards_parameters(accelerator) -> bool:
    """Under FSDP no process holds the whole model: exports rebuild it from the last checkpoint."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def frozen_llm_dtype(config: TrainConfig, accelerator) -> torch.dtype:
    """The LLM's weights in bf16 under bf16 autocast when they do not train (stage 1) or train
    through a LoRA (whose own weights peft keeps in fp32): half the memory of a 7B model. fp32
    otherwise, and under FSDP, whose flat parameters need one dtype (its mixed precision casts)."""
    bf16 = accelerator.mixed_precision == "bf16"
    return torch.bfloat16 if bf16 and not config.full_llm and not shards_parameters(accelerator) else torch.float32


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
        lr = config.group_learning_rate(name)
        groups.append({"params": [p for _, p in params], "lr": lr, "initial_lr": lr, "name": name})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def dry_run_report(model: TrainModel, config: TrainConfig, sequence_length: int, run_dtype: torch.dtype) -> dict:
    """Trainable parameters per group and the memory one process needs: weights (the frozen LLM at
    ``run_dtype`` as a run keeps it), fp32 gradients and AdamW moments of the trainable ones, and
    the activations of one micro-step of ``config.batch_size`` samples of ``sequence_length`` tokens."""
    groups = {name: sum(p.numel() for _, p in params) for name, params in model.trainable_by_group().items()}
    trainable = sum(groups.values())
    frozen_llm_bytes = torch.finfo(run_dtype).bits // 8 if not config.full_llm else None
    weights = sum(p.numel() * (frozen_llm_bytes if frozen_llm_bytes and group_of(name) == LLM_GROUP and not p.requires_grad
                               else p.element_size()) for name, p in model.named_parameters())
    vision = model.vision
    # The ViT's largest case: the base view and every crop of the largest anyres canvas.
    crop = vision.anyres.crop_size
    crops = 1 + max((h // crop) * (w // crop) for h, w in vision.anyres.image_grid_pinpoints)
    vit_tokens = crops * (vision.vit.num_patches + 1)
    # ViT layers past the first CVFM interaction are the ones with a trainable input.
    vit_layers = len(vision.vit.encoder.layers) - min(vision.fusion_config.interaction_layers)
    activations = estimate_activations(
        llm_shape(model.llm.config), model.llm.config.vocab_size, vit_shape(vision.vit.config, vit_layers),
        batch_size=config.batch_size, sequence_length=sequence_length, vit_tokens=vit_tokens,
        checkpointing=config.gradient_checkpointing, dtype=run_dtype)
    optimizer = trainable * OPTIMIZER_BYTES_PER_TRAINABLE
    return {
        "trainable_parameters": groups,
        "trainable_total": trainable,
        "frozen_total": sum(p.numel() for p in model.parameters()) - trainable,
        "weights_bytes": weights,
        "optimizer_bytes": optimizer,
        "activation_bytes": activations.total,
        "activation_parts_bytes": {"llm": activations.llm_bytes, "logits": activations.logits_bytes, "vit": activations.vit_bytes},
        "sequence_length": sequence_length,
        "vit_tokens_per_sample": vit_tokens,
        "batch_size": config.batch_size,
        "gradient_checkpointing": config.gradient_checkpointing,
        "compute_dtype": str(run_dtype).removeprefix("torch."),
        "memory_estimate_bytes": weights + optimizer + activations.total,
    }


def longest_sequence(config: TrainConfig, model: TrainModel, tokenizer) -> int:
    """The longest sample (text + visual tokens) among the first DRY_RUN_SAMPLES of --data; a
    dry run reads no more, to stay quick. --max-length when none of them is usable."""
    renderer = ChatRenderer(tokenizer)
    lengths = []
    for index, record in enumerate(read_records(Path(config.data))[:DRY_RUN_SAMPLES]):
        try:
            lengths.append(prepare_sample(record, index, Path(config.images), renderer, model.vision, config.max_length).length)
        except BadSample:
            continue
    return max(lengths, default=config.max_length)


def train(config: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          callbacks: Callbacks | None = None, adapt_model: Callable[[TrainModel], None] | None = None) -> TrainResult:
    """Run (or resume) training into ``config.out``; ``stop_after`` steps of the planned schedule
    then stop as if interrupted (a later ``resume`` goes on). ``adapt_model`` changes the built
    model in place before training, in every process (experiments swap a module's input)."""
    run_dir = Path(config.out)
    accelerator = make_accelerator(config.device)
    # Only the first process reports: one progress bar, one set of warnings.
    callbacks = (callbacks or Callbacks()) if accelerator.is_main_process else Callbacks()
    if not resume and (run_dir / CONFIG_FILE).exists():
        raise UsageError(f"{run_dir} already holds a run; pass --resume to go on with it, or another --out")
    accelerator.wait_for_everyone()  # every process has checked before the first one writes
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config, llm_dtype=frozen_llm_dtype(config, accelerator))
    if config.save_base and shards_parameters(accelerator):
        raise UsageError("--save-base needs the whole model in one process; it is not available under FSDP")
    if adapt_model is not None:
        adapt_model(model)
    model.to(accelerator.device)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    data = prepare_data(Path(config.data), Path(config.images), ChatRenderer(tokenizer), model.vision, config.max_length,
                        warn=callbacks.warn, on_progress=callbacks.preparing)
    pages = render_pages(data.samples, model.vision) if config.cache_pages else None
    global_batch = config.batch_size * config.grad_accum * accelerator.num_processes
    steps_per_epoch = len(data.samples) // global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"{config.data}: {len(data.samples)} usable samples ({data.n_skipped} skipped), fewer than one global batch of {global_batch}")
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = math.ceil(config.warmup_ratio * total)

    # The optimiser is made on the plain model; prepare() wraps both (DDP, or FSDP's sharding).
    engine, optimizer = accelerator.prepare(model, make_optimizer(model, config))
    trainable = trainable_names(model)
    start = 0
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(config, run_dir)
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            start = restore_checkpoint(checkpoint, engine, optimizer.optimizer, trainable)["step"]
        if accelerator.is_main_process:
            truncate_metrics(run_dir, start)

    callbacks.started(total, start)
    end = total if stop_after is None else min(total, start + stop_after)
    last_loss, started_at, timed_steps, timed_samples = None, None, 0, 0
    for step in range(start, end):
        step_started = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        order = epoch_order(len(data.samples), config.seed, epoch)
        batch = [data.samples[i] for i in order[position * global_batch : (position + 1) * global_batch]]
        loss = run_step(accelerator, engine, model, optimizer, batch, step, total, warmup, config, pages)
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
        if accelerator.is_main_process and ((step + 1) % config.log_every == 0 or step + 1 == total):
            append_metrics(run_dir, record)
        callbacks.step(record)
        if (step + 1) % config.save_every == 0 or step + 1 == end:
            # Every process takes part in gathering (FSDP); the first one writes.
            weights, optimizer_state = gather_checkpoint(engine, optimizer.optimizer, trainable, shards_parameters(accelerator),
                                                          accelerator.device)
            if accelerator.is_main_process:
                save_checkpoint(run_dir, step + 1, weights, optimizer_state, {"skipped": dict(data.skipped), "total_steps": total})
            accelerator.wait_for_everyone()
    sharded = shards_parameters(accelerator)
    if accelerator.is_main_process and end == total and config.export:
        if sharded:  # no process holds the whole model: rebuild it from the final checkpoint
            export_checkpoint(run_dir)
        else:
            export_run(run_dir, config, model.vision, model.llm)
    if accelerator.is_main_process and end == total and config.save_base:
        save_base_checkpoint(model.vision, model.llm, Path(config.base), run_dir / BASE_DIR)
    if accelerator.is_main_process:
        plot_loss(run_dir)
    callbacks.finished()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    wall = time.perf_counter() - started_at if started_at else None
    return TrainResult(run_dir, end, last_loss, data.n_skipped,
                       wall / timed_steps if wall and timed_steps else None,
                       timed_samples / wall if wall and timed_steps else None, None if sharded else model,
                       parallelism=str(accelerator.distributed_type).split(".")[-1], processes=accelerator.num_processes,
                       is_main=accelerator.is_main_process)


def trainable_names(model: TrainModel) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def gather_checkpoint(engine, optimizer: torch.optim.Optimizer, trainable: list[str], sharded: bool,
                      device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights by parameter name, the optimiser's state dict keyed by parameter name),
    whole tensors on the CPU of the first process: the same names in one process, under DDP and
    under FSDP. Collective: every process calls it."""
    # On a GPU, only the first process receives the tensors, copied to its CPU. On a CPU that copy
    # is no copy, and FSDP's optimiser-state gather, which then skips its own clone, hands back
    # exp_avg and exp_avg_sq as views of one reused buffer: gather without offloading there.
    offload = device.type != "cpu"
    # Unsharded, frozen weights are left out before any copy (a 7B LLM at every checkpoint). FSDP
    # gathers every unit whole anyway, and torch's filter fails on the processes that receive
    # nothing, so there the names are filtered after.
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload, ignore_frozen_params=not (sharded and offload))
    weights, optimizer_state = get_state_dict(engine, optimizer, options=options)
    return {name: weights[name] for name in trainable if name in weights}, optimizer_state


def restore_checkpoint(directory: Path, engine, optimizer: torch.optim.Optimizer, trainable: list[str]) -> dict:
    """Load a checkpoint into the (wrapped: DDP, FSDP) model and its optimiser in place; returns its state.json."""
    weights, optimizer_state, state = read_checkpoint(directory)
    missing = [name for name in trainable if name not in weights]
    if missing:
        raise UsageError(f"{directory}: the checkpoint lacks {missing[0]}; was it written by a run with other settings?")
    set_state_dict(engine, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))
    return state


def run_step(accelerator, engine, model: TrainModel, optimizer, batch, step: int, total: int, warmup: int,
             config: TrainConfig, pages: dict[int, RenderedPage] | None = None) -> float:
    """One optimiser step over the global ``batch``; returns its mean loss per label token."""
    torch.manual_seed(config.seed * _STEP_SEED_STRIDE + step)
    world, rank = accelerator.num_processes, accelerator.process_index
    n_labels = sum(sample.tokens.n_label_tokens for sample in batch)
    loss_sum = torch.zeros((), device=accelerator.device)
    for micro in range(config.grad_accum):
        first = (micro * world + rank) * config.batch_size
        mine = batch[first : first + config.batch_size]
        if pages is not None:
            images = [pages[sample.index].normalized(model.vision.anyres, accelerator.device) for sample in mine]
        else:
            images = [load_sample_image(sample, model.vision) for sample in mine]
        last = micro == config.grad_accum - 1
        # Gradients are exchanged once per optimiser step, after the last micro-step.
        sync = contextlib.nullcontext() if last else accelerator.no_sync(engine)
        with sync:
            with accelerator.autocast():
                loss = engine(mine, images)
            # DDP and FSDP average gradients over processes; scaling by world makes it the global sum.
            accelerator.backward(loss * world / n_labels)
        loss_sum += loss.detach()
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    accelerator.clip_grad_norm_(engine.parameters(), config.max_grad_norm)
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
    restore_trainable(checkpoint, [(name, p) for name, p in model.named_parameters() if p.requires_grad], "it belongs to another run")
    return export_run(run_dir, config, model.vision, model.llm)


def dry_run(config: TrainConfig) -> dict:
    model, tokenizer = build_model(config)
    gpu_bf16 = config.device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    run_dtype = torch.bfloat16 if gpu_bf16 else torch.float32  # what make_accelerator's default autocasts to
    return dry_run_report(model, config, longest_sequence(config, model, tokenizer), run_dtype)
