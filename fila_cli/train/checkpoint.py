"""Checkpoints as safetensors + JSON: nothing is unpickled when a run resumes.

``RUN_DIR/checkpoints/step-NNNNNNN/``:
- ``trainable.safetensors``: every trainable parameter, by its name in TrainModel;
- ``optimizer.safetensors``: AdamW's per-parameter state (``{param name}::{key}``);
- ``state.json``: the step, the optimiser's hyper-parameters and parameter names per group, the run's counters.

Parameters are named as in TrainModel, whatever wrapped it (DDP, FSDP): the loop gathers them with
``torch.distributed.checkpoint.state_dict``, whose optimiser state dicts are keyed by those names.

A checkpoint is written into a temporary folder and renamed into place, so a run killed while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fila_cli.errors import UsageError

CHECKPOINTS_DIR = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_STEP_DIGITS = 7
_KEY_SEPARATOR = "::"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{step:0{_STEP_DIGITS}d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS_DIR).glob("step-*[0-9]"))
    return found[-1] if found else None


def _own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with its own storage: FSDP's gathered optimiser state can hand back views of
    one buffer (exp_avg next to exp_avg_sq), which safetensors refuses to write."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict, extra: dict) -> Path:
    """Write ``weights`` and ``optimizer_state`` (a state dict keyed by parameter name, as
    ``get_optimizer_state_dict`` returns it) as a checkpoint of ``step``."""
    final = checkpoint_dir(run_dir, step)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({name: _own_copy(tensor) for name, tensor in weights.items()}, str(partial / TRAINABLE_FILE))
    tensors = {f"{name}{_KEY_SEPARATOR}{key}": _own_copy(torch.as_tensor(value))
               for name, state in optimizer_state["state"].items() for key, value in state.items()}
    save_file(tensors, str(partial / OPTIMIZER_FILE))
    (partial / STATE_FILE).write_text(json.dumps({"step": step, "param_groups": optimizer_state["param_groups"], **extra}, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def read_state(directory: Path) -> dict:
    path = directory / STATE_FILE
    if not path.is_file():
        raise UsageError(f"{directory}: not a training checkpoint (no {STATE_FILE}); pass a RUN_DIR/checkpoints/step-N folder")
    return json.loads(path.read_text())


def load_trainable(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / TRAINABLE_FILE))


def restore_trainable(directory: Path, named_params: list[tuple[str, torch.nn.Parameter]], hint: str) -> None:
    """Copy the checkpoint's trainable weights into ``named_params`` in place; one missing is an error with ``hint``."""
    weights = load_trainable(directory)
    missing = [name for name, _ in named_params if name not in weights]
    if missing:
        raise UsageError(f"{directory}: the checkpoint lacks {missing[0]}; {hint}")
    with torch.no_grad():
        for name, param in named_params:
            param.copy_(weights[name])


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable weights, the optimiser state dict keyed by parameter name, state.json)."""
    state = read_state(directory)
    if any("params" not in group for group in state.get("param_groups", [{}])):
        raise UsageError(f"{directory}: written by an earlier fila train (its optimiser groups are not named); "
                         "redo the run, or export it with fila train export")
    optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(directory / OPTIMIZER_FILE)).items():
        name, field = key.split(_KEY_SEPARATOR)
        optimizer_state.setdefault(name, {})[field] = value
    return load_trainable(directory), {"state": optimizer_state, "param_groups": state["param_groups"]}, state
