"""Time to the first token of a second `fila ask` on a page, with the LLM prefix state on disk.

Issue 12's goal: a second `fila ask` on a page already asked about reaches its first token in
<= 5 % of the first one's time, with a 7B-shaped model on a CPU. Each ask runs in its own process
(as two `fila ask` commands do), with its own model load; the table shows the time from the
`ask` call to the first streamed token, model loading excluded (it is the same for every row):

- first ask: render + encode + prefill of [prompt, page, question] (and the prefix written to disk)
- second ask, token cache only: the visual tokens come from disk, the page is prefilled again
- second ask, token cache + prefix state: the LLM state after [prompt, page] is loaded from disk

Weights are random (the cost is the same). The LLM is llama-shaped: --llm-width, --llm-layers,
--llm-heads, --llm-ff; `--shape 7b` is LLaVA-1.6-Vicuna-7B's (4096 wide, 32 layers, 32 heads, 32
KV heads, 11008 FFN). It is written in f16 one tensor at a time (13 GB on disk for 7B, one tensor in
memory), then quantised by llama.cpp's own quantiser (``llama_model_quantize``) to --quant (Q4_0 by
default, as people run 7B models on a laptop: 3.6 GB) and the f16 file deleted; --quant f16 keeps
it. The vision side is the full ViT-L/14-336 mmproj with --vision full, or the tests' tiny tower with
--vision tiny (the LLM rows are what this benchmark is about; the tiny tower only makes the first
row cheaper). --workdir keeps the bundle between runs (a 7B build takes minutes).

Usage: python benchmarks/prefix_store.py [--shape 7b | --llm-width 1024 --llm-layers 8] [--vision full|tiny]
                                         [--quant Q4_0|Q8_0|f16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout: fila_cli, tests.helpers
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {"7b": dict(llm_width=4096, llm_layers=32, llm_heads=32, llm_ff=11008)}
# --quant -> llama_ftype name in llama_cpp; f16: the written file as it is
QUANT_TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": None}
QUESTION = "What is the total due?"
# A page's visual tokens plus a question need more than llama.cpp's default context of the tiny tests.
N_CTX_TRAIN = 8192


def child(bundle: str, pdf: str, use_prefix_store: bool, max_tokens: int) -> None:
    """One `fila ask`, as the command runs it; prints its timings as JSON."""
    from fila_cli import Asker, AskOptions, ModelOptions, SamplingParams

    started = time.perf_counter()
    asker = Asker.from_options(ModelOptions(model=bundle, device="cpu"))
    if not use_prefix_store:
        asker.prefix_store = None
    load_s = time.perf_counter() - started
    first_token: list[float] = []
    started = time.perf_counter()
    answer = asker.ask(pdf, QUESTION, AskOptions(sampling=SamplingParams(max_tokens=max_tokens)),
                       on_text=lambda piece: first_token.append(time.perf_counter()) if not first_token else None)
    total_s = time.perf_counter() - started
    print(json.dumps({"load_s": load_s, "first_token_s": (first_token[0] - started) if first_token else total_s,
                      "total_s": total_s, "answer": answer.answer, "timings": answer.timings,
                      "visual": answer.tokens["visual"], "embedding_rows": asker.backend.stats.embedding_rows}))


def run_child(bundle: Path, pdf: Path, cache: Path, use_prefix_store: bool, max_tokens: int) -> dict:
    env = {**os.environ, "FILA_CACHE_DIR": str(cache), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run([sys.executable, __file__, "--child", str(bundle), str(pdf), str(int(use_prefix_store)),
                                str(max_tokens)], capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        sys.exit(f"benchmark child failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def quantise(source: Path, target: Path, quant: str) -> None:
    """``source`` (f16 GGUF) -> ``target`` at ``quant``, by llama.cpp's quantiser (as `llama-quantize`)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        sys.exit(f"llama_model_quantize failed ({status}) on {source}")


def build_bundle(directory: Path, args: argparse.Namespace) -> None:
    """The bundle's files, unless ``directory`` already holds them for the same arguments (--workdir)."""
    from tests.helpers.tiny_llm import build_large_llm

    recipe = {k: getattr(args, k) for k in ("llm_width", "llm_layers", "llm_heads", "llm_ff", "vision", "quant")}
    stamp = directory / "recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        print(f"reusing the bundle in {directory}", file=sys.stderr)
        return
    directory.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    started = time.perf_counter()
    f16 = directory / ("llm.gguf" if args.quant == "f16" else "llm-f16.gguf")
    build_large_llm(f16, n_embd=args.llm_width, n_layer=args.llm_layers, n_head=args.llm_heads, n_ff=args.llm_ff,
                    n_ctx_train=N_CTX_TRAIN)
    print(f"wrote {f16} ({f16.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.quant != "f16":
        started = time.perf_counter()
        quantise(f16, directory / "llm.gguf", args.quant)
        f16.unlink()
        print(f"quantised to {args.quant} ({(directory / 'llm.gguf').stat().st_size / 1e9:.1f} GB) in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.vision == "full":
        from caches import write_full_size_mmproj

        write_full_size_mmproj(directory / "mmproj.gguf", args.llm_width)
    else:
        from tests.helpers.tiny_bundle import write_tiny_mmproj

        write_tiny_mmproj(directory / "mmproj.gguf", llm_width=args.llm_width)
    stamp.write_text(json.dumps(recipe))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a real model's shape (overrides the --llm-* sizes)")
    parser.add_argument("--llm-width", type=int, default=1024)
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--llm-heads", type=int, default=16)
    parser.add_argument("--llm-ff", type=int, default=2816)
    parser.add_argument("--vision", choices=("full", "tiny"), default="full")
    parser.add_argument("--quant", choices=sorted(QUANT_TYPES), default="Q4_0", help="the LLM's weights (default Q4_0)")
    parser.add_argument("--workdir", type=Path, help="keep the bundle here and reuse it (default: a temporary folder)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        bundle, pdf, use_prefix_store, max_tokens = args.child
        child(bundle, pdf, use_prefix_store == "1", int(max_tokens))
        return
    if args.shape:
        for name, value in SHAPES[args.shape].items():
            setattr(args, name, value)
    from tests.helpers.bad_documents import make_good_pdf

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bundle = (args.workdir or scratch) / "bundle"
        build_bundle(bundle, args)
        pdf = make_good_pdf(scratch / "page.pdf", ["Invoice 2291. Total due: 1,234.00 EUR. Signed by Ada Lovelace."])
        cache = scratch / "cache"
        first = run_child(bundle, pdf, cache, True, args.max_tokens)
        tokens_only = run_child(bundle, pdf, cache, False, args.max_tokens)
        with_prefix = run_child(bundle, pdf, cache, True, args.max_tokens)
        state_bytes = sum(p.stat().st_size for p in (cache / "llm-prefix").glob("*.llstate"))
    if not first["answer"] == tokens_only["answer"] == with_prefix["answer"]:
        print("warning: the three asks did not give the same answer", file=sys.stderr)
    print(f"time to the first token of `fila ask` on a Letter page ({first['visual']} visual tokens): LLM "
          f"{args.llm_width} wide x {args.llm_layers} layers, {args.llm_heads} heads, FFN {args.llm_ff} ({args.quant}), "
          f"vision {args.vision}; prefix state on disk {state_bytes / 1e6:.0f} MB; model load "
          f"~{first['load_s']:.1f} s per process, not counted")
    print(f"{'ask':<42} {'first token s':>13} {'of first':>9} {'image rows decoded':>19}")
    for name, row in (("first ask (render, encode, prefill)", first),
                      ("second ask, token cache only", tokens_only),
                      ("second ask, token cache + prefix state", with_prefix)):
        print(f"{name:<42} {row['first_token_s']:13.2f} {row['first_token_s'] / first['first_token_s']:8.1%} "
              f"{row['embedding_rows']:19d}")


if __name__ == "__main__":
    main()
