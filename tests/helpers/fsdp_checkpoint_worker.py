"""Run by tests/test_train.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): fila train's
checkpoint path under torch's FSDP, which accelerate will not select on a CPU.

Each process builds the same tiny stage-2 model (LoRA), wraps it in FSDP (one unit per decoder
layer, ``use_orig_params`` as examples/accelerate/fsdp.yaml sets it), takes one optimiser step on
its own sample, then:
1. ``gather_checkpoint`` + ``save_checkpoint``: RUN/checkpoints/step-0000001;
2. a fresh sharded model and optimiser, ``restore_checkpoint`` from it, and one more
   ``gather_checkpoint``, saved as RUN/checkpoints/step-0000002: it must equal step 1;
3. the first process also takes the same step unsharded, on both samples, and saves it as
   RUN/reference/step-0000001.

Usage: torchrun --nproc_per_node 2 tests/helpers/fsdp_checkpoint_worker.py WORKSPACE RUN
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from fila_cli.train.build import build_model
from fila_cli.train.chat import ChatRenderer
from fila_cli.train.checkpoint import checkpoint_dir, save_checkpoint
from fila_cli.train.config import TrainConfig
from fila_cli.train.loop import gather_checkpoint, make_optimizer, restore_checkpoint, trainable_names
from fila_cli.train.prepare import load_sample_image, prepare_data


def build(workspace: Path, run: Path):
    config = TrainConfig(stage=2, data=str(workspace / "data.json"), images=str(workspace / "images"),
                         base=str(workspace / "base"), out=str(run), fusion_config=str(workspace / "fusion.json"),
                         lora_r=4, lora_alpha=8.0, lr=1e-2)
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config)
    return config, model, tokenizer


def shard(model):
    layer_classes = {type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules}
    assert layer_classes, model._no_split_modules
    return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"),
                auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes))


def step(engine, model, optimizer, samples, world: int) -> None:
    """One optimiser step, the loss normalised as fila train's run_step does."""
    n_labels = sum(s.tokens.n_label_tokens for s in samples)
    rank = dist.get_rank() if world > 1 else 0
    mine = samples[rank::world]
    loss = engine(mine, [load_sample_image(s, model.vision) for s in mine])
    (loss * world / n_labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    workspace, run = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    world, first = dist.get_world_size(), dist.get_rank() == 0
    config, model, tokenizer = build(workspace, run)
    names = trainable_names(model)
    samples = prepare_data(Path(config.data), Path(config.images), ChatRenderer(tokenizer), model.vision, 4096, warn=print).samples[:world]

    engine = shard(model)
    optimizer = make_optimizer(model, config)
    step(engine, model, optimizer, samples, world)
    weights, optimizer_state = gather_checkpoint(engine, optimizer, names, sharded=True, device=torch.device("cpu"))
    if first:
        save_checkpoint(run, 1, weights, optimizer_state, {})
    dist.barrier()

    _, fresh, _ = build(workspace, run)
    fresh_engine = shard(fresh)
    fresh_optimizer = make_optimizer(fresh, config)
    restore_checkpoint(checkpoint_dir(run, 1), fresh_engine, fresh_optimizer, names)
    weights, optimizer_state = gather_checkpoint(fresh_engine, fresh_optimizer, names, sharded=True, device=torch.device("cpu"))
    if first:
        save_checkpoint(run, 2, weights, optimizer_state, {})

        _, plain, _ = build(workspace, run)
        plain_optimizer = make_optimizer(plain, config)
        step(plain, plain, plain_optimizer, samples, 1)
        weights, optimizer_state = gather_checkpoint(plain, plain_optimizer, names, sharded=False, device=torch.device("cpu"))
        save_checkpoint(run / "reference", 1, weights, optimizer_state, {})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
