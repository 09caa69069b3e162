"""Turning a run into a bundle ``fila ask --model RUN_DIR`` runs.

- ``fusion.safetensors`` + ``fusion.json``: CVFM, the ConvNeXt branch, the trained projector and
  image_newline (fila's fusion weights format, read by ``fila_cli.vision.loaders.fusion_weights``);
- after stage 2 with ``--full-llm``, ``llm-f16.gguf`` and its quantisation (``llm-q4_k_m.gguf``);
- after stage 2 with LoRA, ``llm-lora.gguf``: the GGUF LoRA adapter llama.cpp applies on the base GGUF;
- ``bundle.json``: the LLM GGUF (``--llm-gguf``), the base checkpoint as the vision weights (its ViT
  is frozen in both stages), the fusion weights and the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

from fila_cli.bundles.bundle import BUNDLE_FILE, FUSION_STEM, SAFETENSORS_SUFFIX
from fila_cli.config import fusion_config_path
from fila_cli.errors import UsageError
from fila_cli.train.config import TrainConfig
from fila_cli.vision.loaders.fusion_weights import save_fusion_weights
from fila_cli.vision.model.encoder import HybridEncoder

FUSION_FILE = FUSION_STEM + SAFETENSORS_SUFFIX


def export_run(run_dir: Path, config: TrainConfig, encoder: HybridEncoder, llm=None) -> list[Path]:
    """Write the run's fusion weights, its LLM (stage 2) and bundle.json; returns the files written."""
    assert encoder.fusion_config is not None
    llm_files: dict[str, str] = {}
    written: list[Path] = []
    if config.stage == 2 and llm is not None and not config.full_llm:
        from fila_cli.train.gguf_export import ADAPTER_FILE, write_lora_adapter

        written.append(write_lora_adapter(run_dir / ADAPTER_FILE, llm, llm.config))
        llm_files["lora"] = ADAPTER_FILE
    if config.stage == 2 and llm is not None and config.full_llm:
        from fila_cli.train.gguf_export import write_full_llm

        if config.llm_gguf is None:
            raise UsageError("--full-llm needs --llm-gguf, the base model's GGUF: its tokenizer and settings are copied into the export")
        full = write_full_llm(run_dir, llm, Path(config.llm_gguf), config.quantization)
        written.append(full)
        llm_files["llm"] = full.name
    fusion = run_dir / FUSION_FILE
    save_fusion_weights(fusion, encoder.fusion_config, encoder.state_dict())  # atomically
    written += [fusion, fusion_config_path(fusion)]
    if config.llm_gguf is not None:
        # A manifest names only files in its folder (bundles refuse any other): the base files the run
        # was trained from are linked in; the run's own files by name (llm, lora override the base).
        base_files = {"llm": _link_in(run_dir, BASE_LLM_LINK, Path(config.llm_gguf)),
                      "vision": _link_in(run_dir, BASE_VISION_LINK, Path(config.base))}
        bundle = {
            "name": run_dir.name,
            "description": f"fila train stage {config.stage} run {run_dir.name}",
            "files": {**base_files, "fusion": FUSION_FILE, **llm_files},
        }
        (run_dir / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2) + "\n")
        written.append(run_dir / BUNDLE_FILE)
    return written


# The base files a run's bundle.json names, as symbolic links in the run's folder.
BASE_LLM_LINK = "base-llm.gguf"
BASE_VISION_LINK = "base-vision"


def _link_in(run_dir: Path, name: str, target: Path) -> str:
    """``name`` in ``run_dir``, a symbolic link to ``target`` (made or re-pointed; a file fila did not
    link there is never replaced)."""
    link = run_dir / name
    target = target.resolve()
    if link.is_symlink():
        if link.resolve() == target:
            return name
        link.unlink()
    elif link.exists():
        raise UsageError(f"{link} exists and is not fila's link to the base; move it away and export again")
    link.symlink_to(target, target_is_directory=target.is_dir())
    return name

