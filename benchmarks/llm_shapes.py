"""Random-weight LLMs of a real model's shape, quantised by llama.cpp, cached for benchmarks.

A benchmark of the LLM's cost needs the real shapes and every layer (no extrapolation), not real
weights: the arithmetic does not depend on the values. ``seven_b_gguf("Q4_K_M")`` gives a
Mistral-7B-shaped GGUF (4096 wide, 32 layers, 32 query heads, 8 KV heads, FFN 14336, vocabulary
32000) quantised by llama.cpp's own quantiser (``llama_model_quantize``), as a downloaded
Q4_K_M/Q4_0/Q8_0 file is made:

    from llm_shapes import seven_b_gguf
    path = seven_b_gguf("Q4_K_M")        # ~/.cache/fila-bench/mistral-7b-shape-s0.Q4_K_M.gguf

The f16 source (14.5 GB) is written tensor by tensor with gguf's ``GGUFWriter`` (tensor infos
first, then each tensor's data as it is drawn), so at most one tensor (the 0.5 GB embedding table)
is in memory; it is deleted once the asked quantisations exist. Files are cached under
``~/.cache/fila-bench/`` (``FILA_BENCH_CACHE`` overrides), keyed by shape, seed and quantisation;
a lock file serialises two benchmarks asking at once, and files appear by atomic rename only.

Run as a script to make (or find) the files: ``python benchmarks/llm_shapes.py Q4_K_M Q4_0 Q8_0``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout: fila_cli, tests.helpers

from tests.helpers.tiny_llm import build_large_llm  # noqa: E402

CACHE_ENV = "FILA_BENCH_CACHE"
F16_SOURCE = "F16"
# llama_ftype values (llama.h) of the quantisations a benchmark may ask for.
QUANT_FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}


@dataclass(frozen=True)
class LlmShape:
    """The hyper-parameters that set an LLM's cost (llama.cpp's llama architecture)."""

    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope_freq_base: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_width(self) -> int:
        return self.n_head_kv * self.head_dim


# Mistral-7B-Instruct-v0.2 (the LLM of LLaVA-1.6-Mistral-7B, fila's default bundle).
MISTRAL_7B = LlmShape(name="mistral-7b-shape", n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336,
                      n_vocab=32000, n_ctx_train=32768, rope_freq_base=1e6)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fila-bench")


def gguf_path(shape: LlmShape, quant: str, seed: int = 0) -> Path:
    return cache_dir() / f"{shape.name}-s{seed}.{quant}.gguf"


# --- the f16 source, streamed -------------------------------------------------------------------


def write_f16_gguf(path: Path, shape: LlmShape, *, seed: int = 0) -> Path:
    """A random-weight f16 GGUF of ``shape``, written one tensor at a time (the tests' writer)."""
    return build_large_llm(path, n_embd=shape.n_embd, n_layer=shape.n_layer, n_head=shape.n_head, n_ff=shape.n_ff,
                           n_head_kv=shape.n_head_kv, n_vocab=shape.n_vocab, n_ctx_train=shape.n_ctx_train,
                           rope_freq_base=shape.rope_freq_base, seed=seed, name=shape.name)


# --- quantising and caching ---------------------------------------------------------------------


def quantize(source: Path, target: Path, quant: str) -> Path:
    """``target``: ``source`` quantised to ``quant`` by llama.cpp (as its llama-quantize does)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {source} -> {quant}")
    return target


@contextmanager
def _cache_lock() -> Iterator[None]:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another benchmark making the same files waits here
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _log(message: str) -> None:
    print(f"llm_shapes: {message}", file=sys.stderr, flush=True)


def shaped_ggufs(shape: LlmShape, quants: Sequence[str], *, seed: int = 0) -> dict[str, Path]:
    """quant -> the cached GGUF of ``shape`` in that quantisation, made when missing ("F16" keeps the source)."""
    unknown = set(quants) - set(QUANT_FTYPES) - {F16_SOURCE}
    if unknown:
        raise ValueError(f"unknown quantisation {sorted(unknown)}; known: {sorted(QUANT_FTYPES)} and {F16_SOURCE}")
    paths = {quant: gguf_path(shape, quant, seed) for quant in quants}
    with _cache_lock():
        missing = [quant for quant, path in paths.items() if not path.exists()]
        if not missing:
            return paths
        source = gguf_path(shape, F16_SOURCE, seed)
        if not source.exists():
            started = time.perf_counter()
            partial = source.with_suffix(".partial")
            write_f16_gguf(partial, shape, seed=seed)
            partial.rename(source)
            _log(f"wrote {source} ({source.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - started:.0f} s")
        for quant in missing:
            if quant == F16_SOURCE:
                continue
            started = time.perf_counter()
            partial = paths[quant].with_suffix(".partial")
            quantize(source, partial, quant)
            partial.rename(paths[quant])
            _log(f"quantised to {paths[quant]} in {time.perf_counter() - started:.0f} s")
        if F16_SOURCE not in quants:
            source.unlink()  # 14.5 GB of disk, remade in a few minutes if ever needed again
    return paths


def seven_b_gguf(quant: str) -> Path:
    """The Mistral-7B-shaped random-weight GGUF in ``quant`` ("Q4_K_M", "Q4_0", "Q8_0"), cached."""
    return shaped_ggufs(MISTRAL_7B, [quant])[quant]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quants", nargs="+", choices=[*QUANT_FTYPES, F16_SOURCE])
    args = parser.parse_args()
    for quant, path in shaped_ggufs(MISTRAL_7B, args.quants).items():
        print(f"{quant}\t{path}\t{path.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
