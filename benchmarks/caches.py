"""What the caches save on a second question about the same page.

Builds, with random weights: a full-size vision side (ViT-L/14-336 mmproj, f16, projector to
--llm-width) and a llama-architecture GGUF LLM of --llm-width and --llm-layers. Then times, side by
side in one run, a second question on an A4 page:

- no caches: render + encode + prefill of [prompt, image, question] + generate
- token cache: the page's visual tokens come from disk (no render, no encode)
- token cache + prefix reuse: also the LLM state after [prompt, image] is restored, so only the
  question's own tokens are decoded (what ``fila batch`` does with several questions)

Usage: python benchmarks/caches.py [--llm-width 2048] [--llm-layers 4] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: fila_cli, tests.helpers

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from fila_cli.bundles.bundle import resolve_bundle
from fila_cli.caches.folder import CacheFolder
from fila_cli.config import DEFAULT_GRID_PINPOINTS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from fila_cli.llm import SamplingParams
from fila_cli.qa.ask import Asker, AskOptions
from fila_cli.vision.token_cache import TokenCache
from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.mmproj_writer import write_mmproj_gguf
from tests.helpers.tiny_llm import build_tiny_llm


def write_full_size_mmproj(path: Path, llm_width: int) -> None:
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
    tower = CLIPVisionModel(config)
    projector = {"linear_1.weight": torch.randn(llm_width, 1024) * 0.02, "linear_1.bias": torch.zeros(llm_width),
                 "linear_2.weight": torch.randn(llm_width, llm_width) * 0.02, "linear_2.bias": torch.zeros(llm_width)}
    write_mmproj_gguf(path, clip_state=tower.state_dict(), projector_state=projector, image_newline=torch.randn(llm_width) * 0.02,
                      clip_config=config, image_grid_pinpoints=[list(p) for p in DEFAULT_GRID_PINPOINTS],
                      image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, drop_last_block=True, dtype="f16")


def write_benchmark_bundle(directory: Path, llm_width: int, llm_layers: int) -> Path:
    """A bundle folder: the full-size ViT-L/14-336 mmproj and a random llama ``llm_width`` wide,
    ``llm_layers`` deep, whose context holds a page's visual tokens and a question."""
    directory.mkdir()
    build_tiny_llm(directory / "llm.gguf", n_embd=llm_width, n_layer=llm_layers, n_head=16, n_ff=llm_width * 2,
                   n_ctx_train=8192)
    write_full_size_mmproj(directory / "mmproj.gguf", llm_width)
    return directory


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-width", type=int, default=2048)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bundle_dir = write_benchmark_bundle(scratch / "bundle", args.llm_width, args.llm_layers)
        pdf = make_good_pdf(scratch / "page.pdf", ["Invoice 2291. Total due: 1,234.00 EUR. Signed by Ada Lovelace."])
        bundle = resolve_bundle(str(bundle_dir))
        options = AskOptions(sampling=SamplingParams(max_tokens=args.max_tokens))
        plain = Asker.load(bundle, device="cpu", dtype="auto")
        cached = Asker(plain.encoder, plain.backend, plain.template, bundle, token_cache=TokenCache(CacheFolder(scratch / "cache")))
        reusing = Asker(plain.encoder, plain.backend, plain.template, bundle, token_cache=TokenCache(CacheFolder(scratch / "cache2")),
                        reuse_prefix=True)
        first, second = "What is the total due?", "Who signed it?"
        for asker in (cached, reusing):
            asker.ask(pdf, first, options)  # fills the token cache (and, for reusing, the prefix state)
        rows = [
            ("no caches", timed(lambda: plain.ask(pdf, second, options))),
            ("token cache", timed(lambda: cached.ask(pdf, second, options))),
            ("token cache + prefix reuse", timed(lambda: reusing.ask(pdf, second, options))),
        ]
    print(f"second question on an A4 page: ViT-L/14-336 (bf16 where the CPU has it), LLM {args.llm_width} wide x "
          f"{args.llm_layers} layers (f32), {args.max_tokens} new tokens")
    print(f"{'path':<30} {'seconds':>8} {'speed-up':>9}")
    for name, seconds in rows:
        print(f"{name:<30} {seconds:8.2f} {rows[0][1] / seconds:8.1f}x")


if __name__ == "__main__":
    main()
