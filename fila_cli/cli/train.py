"""``fila train`` and ``fila train export``: options in, a progress bar and a summary out.

Everything happens in ``fila_cli.train``; this module only parses options and draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fila_cli.atomic_files import check_output_folder
from fila_cli.cli.help_format import PlainHelpGroup
from fila_cli.cli.support import EXIT_CODES_HELP, VerboseOption, handle_errors, stderr
from fila_cli.errors import UsageError
from fila_cli.train.config import DEFAULT_LORA_ALPHA, DEFAULT_LORA_R, DEFAULT_QUANTIZATION

train_app = typer.Typer(rich_markup_mode=None, cls=PlainHelpGroup, help="Train FILA (stage 1: CVFM + projector; stage 2: + the LLM) and export a bundle.",
                        no_args_is_help=False)

_REQUIRED = ("stage", "data", "images", "base", "out")
_FLAGS = {"out": "--output"}


class _Progress:
    """Rich progress bar on stderr: loss, lr, tokens/s, samples skipped, ETA."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=stderr, transient=False, disable=not stderr.is_terminal)
        self.task = None
        self.prepare_task = None

    def warn(self, message: str) -> None:
        stderr.print(f"fila: warning: {message}", markup=False, highlight=False)

    def preparing(self, done: int, total: int) -> None:
        if self.prepare_task is None:
            self.progress.start()
            self.prepare_task = self.progress.add_task("reading data", total=total, info="")
        self.progress.update(self.prepare_task, completed=done)

    def started(self, total_steps: int, start_step: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("training", total=total_steps, completed=start_step, info="")

    def step(self, record: dict) -> None:
        info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s  "
                f"skipped {record['skipped']}")
        self.progress.update(self.task, completed=record["step"], info=info)

    def finished(self) -> None:
        self.progress.stop()


@train_app.callback(invoke_without_command=True, epilog=EXIT_CODES_HELP)
def train(
    ctx: typer.Context,
    stage: Annotated[int | None, typer.Option(help="1: CVFM + projector train, the rest frozen. 2: the LLM trains too.", show_default=False)] = None,
    data: Annotated[Path | None, typer.Option(help="LLaVA conversation data, .json (a list) or .jsonl.", show_default=False)] = None,
    images: Annotated[Path | None, typer.Option(help="Folder the samples' image paths are relative to.", show_default=False)] = None,
    base: Annotated[Path | None, typer.Option(help="HF LLaVA-NeXT checkpoint directory to start from.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--output", "-o", "--out", metavar="RUN_DIR", help="Run directory: checkpoints, metrics, the exported bundle (created; its folder must exist).", show_default=False)] = None,
    fusion_config: Annotated[Path | None, typer.Option(help="FusionConfig JSON (variant, layers, ConvNeXt). Default: the paper's.", show_default=False)] = None,
    convnext: Annotated[Path | None, typer.Option(help="timm ConvNeXt safetensors to start the branch from.", show_default=False)] = None,
    init: Annotated[Path | None, typer.Option(help="Start from an earlier run's directory (stage 2 from stage 1).", show_default=False)] = None,
    llm_gguf: Annotated[Path | None, typer.Option(help="The base LLM as GGUF; named in RUN_DIR/bundle.json so `fila ask --model RUN_DIR` runs.", show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate. Default: 1e-3 (stage 1), 2e-5 (stage 2).", show_default=False)] = None,
    llm_lr: Annotated[float | None, typer.Option(help="Stage 2: the LLM's learning rate (default: --lr).", show_default=False)] = None,
    fusion_lr: Annotated[float | None, typer.Option(help="CVFM's learning rate (default: --lr, one rate per stage as the paper). Raise it when CVFM starts from scratch beside trained modules.", show_default=False)] = None,
    warmup_ratio: Annotated[float, typer.Option(help="Share of the steps warming up linearly before the cosine decay.")] = 0.03,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Samples per device per micro-step.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-steps per optimiser step.")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Stop the schedule after this many optimiser steps.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order and initialisation.")] = 0,
    max_length: Annotated[int, typer.Option(help="Samples longer than this (text + visual tokens) are skipped.")] = 4096,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N optimiser steps (and at the end).")] = 500,
    log_every: Annotated[int, typer.Option(help="A metrics.jsonl line every N steps.")] = 1,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in the backward pass (less memory).")] = True,
    train_convnext: Annotated[bool, typer.Option(help="Stage 2: train the ConvNeXt branch too.")] = False,
    full_llm: Annotated[bool, typer.Option(help="Stage 2: train the whole LLM instead of a LoRA; export a quantised GGUF.")] = False,
    lora_r: Annotated[int, typer.Option(help="Stage 2: LoRA rank.")] = DEFAULT_LORA_R,
    lora_alpha: Annotated[float, typer.Option(help="Stage 2: LoRA alpha (the update is scaled by alpha / rank).")] = DEFAULT_LORA_ALPHA,
    quantization: Annotated[str, typer.Option(help="--full-llm: llama.cpp quantisation of the exported GGUF (Q4_K_M, Q8_0, F16...).")] = DEFAULT_QUANTIZATION,
    save_base: Annotated[bool, typer.Option(help="Also write RUN_DIR/base/: the trained ViT, projector and LLM as a LLaVA-NeXT checkpoint that --base reads.")] = False,
    cache_pages: Annotated[bool, typer.Option(help="Render every page once into memory (uint8) before training; for data sets whose pages fit in memory.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Go on from the latest checkpoint in --out (its settings are reused).")] = False,
    stop_after: Annotated[int | None, typer.Option(help="Train this many steps of the schedule, checkpoint and stop; --resume goes on.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the trainable parameters per group and a memory estimate, then exit.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run's summary as one JSON object on stdout.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Train FILA on LLaVA conversation data; RUN_DIR becomes a bundle `fila ask --model RUN_DIR` runs."""
    if ctx.invoked_subcommand is not None:
        return
    with handle_errors(verbose):
        from fila_cli.train.config import TrainConfig
        from fila_cli.train.loop import dry_run as plan
        from fila_cli.train.loop import load_config
        from fila_cli.train.loop import train as run

        if resume:
            if out is None:
                raise UsageError("--resume needs --output RUN_DIR, the run to go on with")
            config = load_config(out)
        else:
            given = {"stage": stage, "data": data, "images": images, "base": base, "out": out}
            missing = [name for name in _REQUIRED if given[name] is None]
            if missing:
                raise UsageError(f"missing {', '.join(_FLAGS.get(m, '--' + m) for m in missing)}; see fila train --help")
            check_output_folder(out, is_folder=True)
            try:
                config = TrainConfig(
                    stage=stage, data=str(data), images=str(images), base=str(base), out=str(out),
                    fusion_config=_str(fusion_config), convnext=_str(convnext), init=_str(init), llm_gguf=_str(llm_gguf),
                    lr=lr, llm_lr=llm_lr, fusion_lr=fusion_lr, save_base=save_base, cache_pages=cache_pages, warmup_ratio=warmup_ratio, epochs=epochs, batch_size=batch_size,
                    grad_accum=grad_accum, max_steps=max_steps, seed=seed, max_length=max_length, save_every=save_every,
                    log_every=log_every, gradient_checkpointing=gradient_checkpointing, train_convnext=train_convnext,
                    full_llm=full_llm, lora_r=lora_r, lora_alpha=lora_alpha, quantization=quantization, device=device)
            except ValueError as error:
                raise UsageError(str(error)) from None
        if dry_run:
            report = plan(config)
            _print(report, json_output, _dry_run_lines(report))
            return
        progress = _Progress()
        result = run(config, resume=resume, stop_after=stop_after, callbacks=progress)
        if not result.is_main:
            return  # one summary per run, from the first process
        summary = {"run_dir": str(result.run_dir), "steps": result.steps, "final_loss": result.final_loss,
                   "skipped": result.skipped, "seconds_per_step": result.seconds_per_step,
                   "samples_per_second": result.samples_per_second, "parallelism": result.parallelism,
                   "processes": result.processes}
        _print(summary, json_output, [f"{k}: {v}" for k, v in summary.items()])


@train_app.command("export", epilog=EXIT_CODES_HELP)
def export(
    run_dir: Annotated[Path, typer.Argument(help="A fila train run directory.", show_default=False)],
    checkpoint: Annotated[Path | None, typer.Option(help="A checkpoint folder of the run (default: the latest).", show_default=False)] = None,
    verbose: VerboseOption = False,
) -> None:
    """Redo the export (fusion weights, bundle.json) from a checkpoint."""
    with handle_errors(verbose):
        from fila_cli.train.loop import export_checkpoint

        for path in export_checkpoint(run_dir, checkpoint):
            stderr.print(f"wrote {path}", markup=False, highlight=False)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _dry_run_lines(report: dict) -> list[str]:
    lines = [f"trainable {group}: {count:,} parameters" for group, count in sorted(report["trainable_parameters"].items())]
    parts = report["activation_parts_bytes"]
    lines += [f"trainable in all: {report['trainable_total']:,}; frozen: {report['frozen_total']:,}",
              f"memory estimate per process: {_size(report['memory_estimate_bytes'])} = weights {_size(report['weights_bytes'])}"
              f" + gradients and AdamW moments {_size(report['optimizer_bytes'])} + activations {_size(report['activation_bytes'])}",
              f"activations: LLM {_size(parts['llm'])}, logits {_size(parts['logits'])}, ViT {_size(parts['vit'])} for "
              f"{report['batch_size']} x {report['sequence_length']} tokens (the longest sample read), "
              f"{report['vit_tokens_per_sample']} ViT tokens per image, {report['compute_dtype']}, "
              f"gradient checkpointing {'on' if report['gradient_checkpointing'] else 'off'}"]
    return lines


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _print(summary: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(summary))
    else:
        for line in lines:
            stderr.print(line, markup=False, highlight=False)
