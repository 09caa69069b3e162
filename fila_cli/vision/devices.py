"""Choosing where and in which precision the vision encoder runs."""

from __future__ import annotations

from pathlib import Path

import torch

from fila_cli.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
# CPU features that make bfloat16 matmuls faster than float32 (AMX tiles, AVX512-BF16 dot products).
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to ask cheaply, stay with float32
        return False
    return any(flag in flags.split() for flag in _BF16_CPU_FLAGS)


def pick_device(name: str = "auto") -> torch.device:
    if name not in DEVICE_CHOICES:
        raise UsageError(f"unknown device {name!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple Metal is not available; use --device cpu or auto")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPE_CHOICES:
        raise UsageError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}")
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16":  # what auto picks on MPS and older CUDA cards; on a CPU, slow
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
