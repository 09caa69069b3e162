"""A complete tiny model bundle on disk: a GGUF LLM and an mmproj GGUF that fit each other.

Written with the real writers (gguf), loaded by the real code (llama.cpp, the mmproj loader), so
end-to-end tests exercise exactly what a user's downloaded bundle goes through.
"""

from __future__ import annotations

from pathlib import Path

from fila_cli.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests.helpers.mmproj_writer import write_mmproj_gguf
from tests.helpers.tiny_llm import build_tiny_llm
from tests.helpers.tiny_vision import TINY_LLM_WIDTH, tiny_llava_next, vision_state_hf_names

LLM_FILE = "tiny-llm.gguf"
MMPROJ_FILE = "mmproj-tiny-f16.gguf"


def write_tiny_mmproj(path: Path, *, seed: int = 0, llm_width: int = TINY_LLM_WIDTH) -> Path:
    llava = tiny_llava_next(seed=seed, llm_width=llm_width)
    clip_state, projector_state, newline = vision_state_hf_names(llava)
    write_mmproj_gguf(path, clip_state=clip_state, projector_state=projector_state, image_newline=newline,
                      clip_config=llava.config.vision_config, image_grid_pinpoints=llava.config.image_grid_pinpoints,
                      image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, drop_last_block=True, dtype="f16")
    return path


def build_tiny_bundle(directory: Path, *, seed: int = 0, llm_width: int = TINY_LLM_WIDTH, mmproj_width: int | None = None,
                      n_ctx_train: int = 4096) -> Path:
    """directory/ with an LLM GGUF and an mmproj GGUF; mmproj_width != llm_width makes a mismatched pair.
    n_ctx_train: the context the LLM's GGUF says it was trained on (how far fila may grow its context)."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_llm(directory / LLM_FILE, n_embd=llm_width, seed=seed, n_ctx_train=n_ctx_train)
    write_tiny_mmproj(directory / MMPROJ_FILE, seed=seed, llm_width=mmproj_width or llm_width)
    return directory
