"""LLM prefill of one A4 page's visual tokens: quantisations and llama.cpp settings, side by side.

Issue 13: on the 2-core CPU a 7B-shaped LLM prefilled a page's tokens ten times slower than the
encoder encoded it. This benchmark measures what the prefill costs with fila's own embedding path
(``LlamaBackend.generate``: the prompt's text, the page's visual-token rows through
``llama_batch.embd``, the question) on the Mistral-7B-shaped random-weight GGUF of
``llm_shapes.py`` (every layer), for:

- the quantisation: Q4_K_M (the bundles'), Q4_0 and Q8_0, all made by llama.cpp's own quantiser;
- llama.cpp's batch sizes (n_batch: rows per llama_decode call; n_ubatch: rows per compute graph);
- flash attention off / on;
- threads (prefill and generation).

Each row runs in its own process (a fresh model load, nothing shared), after a short warm-up
decode that pages the weights in; the row's time is the best of ``--repeats`` prefills. The
visual tokens are random rows (the cost does not depend on their values); their number is what
fila makes of an A4 page.

Usage: python benchmarks/llm_prefill.py [--quick] [--repeats 1] [--shape 7b|small]
``--shape small`` runs every row on a tiny LLM in seconds (to check the script, not to measure).
"CPU s" is the process's CPU time (all threads) for the prefill and the answer: on a shared
machine it shows what wall time hides (threads waiting for a core, or spinning at barriers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

A4_PIXELS = (1123, 794)  # an A4 page at 96 dpi, [height, width]; any A4 render plans the same canvas
N_CTX = 4096  # the bundles' context
ANSWER_TOKENS = 16  # a short answer: generation speed beside the prefill
PROMPT = "[INST] "
QUESTION = "\nWhat is the total due? [/INST]"
# A page's embedding rows are O(1) per channel, as the projector's outputs are.
EMBEDDING_STD = 1.0


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    quant: str
    n_batch: int
    n_ubatch: int
    flash_attn: bool
    threads: int

    @property
    def label(self) -> str:
        return (f"{self.quant:<7} batch {self.n_batch:>4} ubatch {self.n_ubatch:>4} "
                f"FA {'on ' if self.flash_attn else 'off'} threads {self.threads}")


def page_visual_tokens() -> int:
    """Visual tokens fila makes of an A4 page (LLaVA-1.6's canvases, 336-pixel crops, 14-pixel patches)."""
    from fila_cli.config import AnyresConfig
    from fila_cli.documents.canvas import plan_canvas
    from fila_cli.vision.token_count import count_visual_tokens

    config = AnyresConfig()
    return count_visual_tokens(plan_canvas(A4_PIXELS, config), config.crop_size // 14)


def rows_to_measure(cores: int, quick: bool) -> list[Row]:
    """The baseline (llama.cpp's defaults) per quantisation, then one knob at a time on Q4_K_M."""
    base = dict(n_batch=512, n_ubatch=512, flash_attn=False, threads=cores)
    rows = [Row(quant, **base) for quant in ("Q4_K_M", "Q4_0", "Q8_0")]
    # Most telling first: --quick keeps the first four.
    variants = [dict(flash_attn=True), dict(n_batch=2048, n_ubatch=2048), dict(n_batch=2048, n_ubatch=2048, flash_attn=True)]
    if cores > 1:
        variants.append(dict(threads=cores // 2))
    variants += [dict(n_batch=2048, n_ubatch=512), dict(n_batch=256, n_ubatch=256)]
    if quick:
        variants = variants[:4]
    rows += [Row("Q4_K_M", **{**base, **variant}) for variant in variants]
    return rows


def child(path: str, row: dict, n_visual: int, repeats: int) -> None:
    """Load the model with the row's settings, warm up, prefill the page; print timings as JSON."""
    import numpy as np

    from fila_cli.llm.backend import LlamaBackend, LlamaSettings
    from fila_cli.llm.sampling import SamplingParams

    row = Row(**row)
    settings = LlamaSettings(n_batch=row.n_batch, n_ubatch=row.n_ubatch, flash_attn=row.flash_attn,
                             n_threads=row.threads, n_threads_batch=row.threads)
    started = time.perf_counter()
    backend = LlamaBackend(path, n_ctx=N_CTX, n_gpu_layers=0, settings=settings)
    load_s = time.perf_counter() - started
    visual = np.random.default_rng(0).standard_normal((n_visual, backend.n_embd), dtype=np.float32) * EMBEDDING_STD
    backend.prefill([PROMPT + QUESTION])  # warm-up: every weight read once (page cache -> this process)
    best = None
    for _ in range(repeats):
        cpu_started = time.process_time()
        answer = backend.generate([PROMPT, visual, QUESTION], SamplingParams(max_tokens=ANSWER_TOKENS))
        run = {"prefill_s": answer.prefill_s, "generate_s": answer.generate_s, "generated": answer.n_generated,
               "cpu_s": time.process_time() - cpu_started,  # every thread's CPU time, prefill and answer
               "first_token_s": answer.prefill_s + answer.first_token_s,
               "prompt_tokens": answer.n_prompt_tokens + answer.n_visual_tokens}
        if best is None or run["prefill_s"] < best["prefill_s"]:
            best = run
    backend.close()
    print(json.dumps({**best, "load_s": load_s}))


def run_row(path: Path, row: Row, n_visual: int, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run([sys.executable, __file__, "--child", str(path), json.dumps(dataclasses.asdict(row)),
                                str(n_visual), str(repeats)], capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else f"exit {completed.returncode}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def model_paths(shape: str, quants: set[str]) -> dict[str, Path]:
    from llm_shapes import MISTRAL_7B, shaped_ggufs

    if shape == "7b":
        return shaped_ggufs(MISTRAL_7B, sorted(quants))
    small = dataclasses.replace(MISTRAL_7B, name="small-check-shape", n_embd=256, n_layer=2, n_head=8, n_head_kv=2, n_ff=512)
    return shaped_ggufs(small, sorted(quants))


def print_table(rows: list[Row], results: list[dict], n_visual: int, shape: str) -> None:
    baseline = results[0].get("prefill_s")
    print(f"prefill of one A4 page ({n_visual} visual tokens + prompt) on the {shape} Mistral-shaped random-weight "
          f"LLM, CPU ({os.cpu_count()} cores), load {os.getloadavg()[0]:.1f}; ratio: prefill time / first row's")
    print(f"{'llama.cpp settings':<50} {'prefill s':>9} {'tok/s':>7} {'ratio':>6} {'1st token s':>11} "
          f"{'decode tok/s':>12} {'CPU s':>7} {'load s':>7}")
    for row, result in zip(rows, results):
        if "error" in result:
            print(f"{row.label:<50} failed: {result['error']}")
            continue
        decode = (result["generated"] - 1) / max(result["generate_s"], 1e-9) if result["generated"] > 1 else float("nan")
        print(f"{row.label:<50} {result['prefill_s']:9.2f} {result['prompt_tokens'] / result['prefill_s']:7.1f} "
              f"{result['prefill_s'] / baseline if baseline else float('nan'):6.2f} {result['first_token_s']:11.2f} "
              f"{decode:12.2f} {result['cpu_s']:7.1f} {result['load_s']:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("7b", "small"), default="7b")
    parser.add_argument("--quick", action="store_true", help="fewer setting rows")
    parser.add_argument("--repeats", type=int, default=1, help="prefills per row (best kept)")
    parser.add_argument("--only", help="run only rows whose label contains this text")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, row, n_visual, repeats = args.child
        child(path, json.loads(row), int(n_visual), int(repeats))
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rows = rows_to_measure(cores, args.quick)
    if args.only:
        rows = [row for row in rows if args.only in row.label]
    paths = model_paths(args.shape, {row.quant for row in rows})
    n_visual = page_visual_tokens()
    results = []
    for row in rows:
        results.append(run_row(paths[row.quant], row, n_visual, args.repeats))
        print(f"{row.label}: {results[-1]}", file=sys.stderr, flush=True)
    print_table(rows, results, n_visual, args.shape)


if __name__ == "__main__":
    main()
