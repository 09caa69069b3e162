"""`fila batch` pages/min with its stages overlapped and one at a time, side by side in one run.

Builds, with random weights: the full-size vision side (ViT-L/14-336 mmproj, f16, as
benchmarks/caches.py writes it) and a llama-architecture GGUF LLM of --llm-width and --llm-layers,
sized so that encoding a page and the LLM's prefill take comparable times. Then runs
``run_batch`` (what `fila batch --no-cache` runs, model loaded once) over --pages one-page scanned
PDFs (no text layer: every page is rendered, encoded and answered), in --rounds rounds of:

- overlap off: ``--pipeline-depth 0``, each page rendered, encoded, answered in turn;
- overlap on: ``--pipeline-depth 1``, the next page rendered and encoded while the LLM answers,
  once for each encoder thread count of --encoder-threads (torch's intra-op threads; llama.cpp
  keeps its own defaults: half the cores for generation, all of them for prefill).

It prints per-stage seconds per page (render in the document worker, encode, LLM = prefill +
generate, from the records' timings), the wall-clock pages/min (steady state: from the first record
to the last, so the model's load and the pipeline's fill are left out), and that rate against the
two bounds from the stage times measured with overlap off: 1 / (sum of the stages), what one stage
at a time can reach, and 1 / (slowest stage), what perfect overlap could reach.

On a CPU the encoder and the LLM share the cores: overlap there gains what one stage leaves idle
(the render is single-threaded in another process, llama.cpp generates on half the cores, Python
and preprocessing between matmuls). State the machine's load (`uptime`) with any figure.

``--parallel 2 4`` adds a row per N: `fila batch --parallel N` (overlap on, ``--pipeline-depth N``),
N answers decoded side by side in one llama.cpp context (``LlamaBackend.generate_many``). A second
table times the LLM alone on prompts of the benchmark's pages (the question around a page's visual
tokens): N prompts one ``generate`` after another against one ``generate_many``, as answers/min, and
the answers' decode steps apart from the prefills (what sharing a decode can save), so that the LLM's
own gain shows even where the encoder is the slowest stage.

Usage: python benchmarks/batch_pipeline.py [--pages 8] [--rounds 2] [--llm-width 2048] [--llm-layers 6]
       [--parallel 2 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: fila_cli, tests.helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from caches import write_benchmark_bundle

from fila_cli.bundles.bundle import resolve_bundle
from fila_cli.llm import LlamaBackend, LlamaSettings, SamplingParams
from fila_cli.qa.ask import Asker, AskOptions
from fila_cli.qa.batch import run_batch
from fila_cli.qa.options import BatchOptions
from fila_cli.qa.run import RecordSink
from tests.helpers.bad_documents import make_good_pdf

QUESTION = "What is the total due?"
SECONDS_PER_MINUTE = 60.0
# Records of one --parallel group are written back to back, this close together (seconds); a page
# answered alone takes far longer than this.
BURST_S = 0.05


class TimedSink(RecordSink):
    """Records to a file, with the moment each was written."""

    def __init__(self, out: Path):
        super().__init__(out)
        self.records: list[dict] = []
        self.written_at: list[float] = []

    def write(self, record: dict) -> None:
        super().write(record)
        self.records.append(record)
        self.written_at.append(time.perf_counter())


def run(asker: Asker, documents: list[Path], options: AskOptions, depth: int, threads: int, out: Path,
        parallel: int = 1) -> dict:
    torch.set_num_threads(threads)
    sink = TimedSink(out)
    try:
        run_batch(asker, documents, [QUESTION], options, sink,
                  BatchOptions(timeout_s=600, pipeline_depth=depth, parallel=parallel))
    finally:
        sink.close()
    failed = [r["error"] for r in sink.records if r["error"] is not None]
    if failed or len(sink.records) != len(documents):
        raise SystemExit(f"{len(failed)} of {len(sink.records)} records failed: {failed[:1]}")
    timings = [r["timings"] for r in sink.records]
    # Steady state: the pages written after the first burst (one record, or a --parallel group's,
    # written back to back), over the time from that burst to the last record.
    first_burst = 1
    while first_burst < len(sink.written_at) and sink.written_at[first_burst] - sink.written_at[first_burst - 1] < BURST_S:
        first_burst += 1
    steady_s = sink.written_at[-1] - sink.written_at[first_burst - 1]
    return {
        "render": statistics.mean(t["render_s"] for t in timings),
        "encode": statistics.mean(t["encode_s"] for t in timings),
        "llm": statistics.mean(t["prefill_s"] + t["generate_s"] for t in timings),
        "pages_per_min": SECONDS_PER_MINUTE * (len(documents) - first_burst) / steady_s,
        "answers": [r["answer"] for r in sink.records],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llm-width", type=int, default=2048)
    parser.add_argument("--llm-layers", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--encoder-threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--parallel", type=int, nargs="*", default=[], help="rows for fila batch --parallel N (N > 1)")
    args = parser.parse_args()
    parallels = sorted({n for n in args.parallel if n > 1})
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bundle_dir = write_benchmark_bundle(scratch / "bundle", args.llm_width, args.llm_layers)
        docs = scratch / "docs"
        docs.mkdir()
        documents = [make_good_pdf(docs / f"scan{i:03d}.pdf", [f"Invoice {i}. Total due: {i * 17},00 EUR."],
                                   scanned_page=0) for i in range(args.pages)]
        asker = Asker.load(resolve_bundle(str(bundle_dir)), device="cpu", dtype="auto")
        # --parallel rows: the same weights, the LLM's context made for N sequences (N KV caches).
        parallel_asker = Asker(asker.encoder, LlamaBackend(asker.bundle.llm, n_ctx=asker.bundle.n_ctx,
                                                           settings=LlamaSettings(n_seq_max=max(parallels))),
                               asker.template, asker.bundle) if parallels else None
        options = AskOptions(sampling=SamplingParams(max_tokens=args.max_tokens))
        run(asker, documents[:2], options, 0, default_threads, scratch / "warm-up.jsonl")  # one-off JIT and page-ins

        # (overlap, pipeline depth, encoder threads, --parallel)
        configs = [("off", 0, default_threads, 1)] + [("on", 1, threads, 1) for threads in args.encoder_threads]
        configs += [(f"on, --parallel {n}", n, default_threads, n) for n in parallels]
        results: dict[tuple, list[dict]] = {config: [] for config in configs}
        for round_ in range(args.rounds):  # interleaved, so that the machine's load drifts over all alike
            for config in configs:
                _, depth, threads, parallel = config
                result = run(asker if parallel == 1 else parallel_asker, documents, options, depth, threads,
                             scratch / f"out-{depth}-{threads}-{parallel}-{round_}.jsonl", parallel=parallel)
                results[config].append(result)
                print(f"round {round_ + 1}, overlap {config[0]}, {threads} encoder threads: "
                      f"{result['pages_per_min']:.2f} pages/min (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        torch.set_num_threads(default_threads)
        llm_rows = llm_alone(parallel_asker, documents, options, parallels, args.rounds) if parallels else []

    reference = results[configs[0]]
    stages = {stage: statistics.median(r[stage] for r in reference) for stage in ("render", "encode", "llm")}
    sum_bound = SECONDS_PER_MINUTE / sum(stages.values())
    slowest_bound = SECONDS_PER_MINUTE / max(stages.values())
    print(f"{args.pages} one-page scans, full-size encoder ({asker.encoder.dtype}), LLM {args.llm_width} wide x "
          f"{args.llm_layers} layers, {args.max_tokens} answer tokens; {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; medians of {args.rounds} rounds")
    print(f"bounds from the stages with overlap off: 1/(sum) = {sum_bound:.2f} pages/min, "
          f"1/(slowest stage) = {slowest_bound:.2f} pages/min")
    print("| overlap | encoder threads | render s | encode s | LLM s | pages/min | × 1/(sum) | of 1/(slowest) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for config in configs:
        name, _, threads, _ = config
        median = {key: statistics.median(r[key] for r in results[config])
                  for key in ("render", "encode", "llm", "pages_per_min")}
        rate = median["pages_per_min"]
        print(f"| {name} | {threads} | {median['render']:.2f} | {median['encode']:.2f} | {median['llm']:.2f} | "
              f"{rate:.2f} | {rate / sum_bound:.2f} | {rate / slowest_bound:.0%} |")
    same = all(r["answers"] == reference[0]["answers"] for runs in results.values() for r in runs)
    print(f"answers identical in every run: {same}")
    if llm_rows:
        print()
        print(f"the LLM alone: N page prompts ({llm_rows[0]['visual']} visual tokens each, {args.max_tokens} answer "
              f"tokens), one generate after another vs one generate_many; best of {args.rounds}; load "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("| N | one after another s | generate_many s | answers/min alone | answers/min together | × | "
              "answer steps alone s | answer steps together s | × | same answers |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for row in llm_rows:
            alone, together = SECONDS_PER_MINUTE * row["n"] / row["alone_s"], SECONDS_PER_MINUTE * row["n"] / row["together_s"]
            print(f"| {row['n']} | {row['alone_s']:.2f} | {row['together_s']:.2f} | {alone:.2f} | {together:.2f} | "
                  f"{together / alone:.2f} | {row['alone_steps_s']:.2f} | {row['together_steps_s']:.2f} | "
                  f"{row['alone_steps_s'] / row['together_steps_s']:.2f} | {row['same']} |")


def llm_alone(asker: Asker, documents: list[Path], options: AskOptions, parallels: list[int], rounds: int) -> list[dict]:
    """The LLM stage alone: N prompts of the question around a page's visual tokens, through
    ``generate`` one after another and through one ``generate_many``, side by side, best of ``rounds``."""
    from fila_cli.documents.document import open_document
    from fila_cli.qa.ask import OnePromptQuestion, new_timings

    prompts = []
    for document in documents[: max(parallels)]:
        with open_document(document) as opened:
            pages = list(asker.prepare_pages(str(document), [asker.local_page_source(opened, 0, options)], None,
                                             new_timings(), text_layer=False))
        prompts.append(asker.one_prompt(OnePromptQuestion(str(document), QUESTION, pages, "", "", new_timings()), options))
    backend, rows = asker.backend, []
    for n in [1, *parallels]:
        best = {key: float("inf") for key in ("alone_s", "together_s", "alone_steps_s", "together_steps_s")}
        for _ in range(rounds):
            started = time.perf_counter()
            alone = [backend.generate(prompt, options.sampling) for prompt in prompts[:n]]
            alone_s = time.perf_counter() - started
            started = time.perf_counter()
            together = backend.generate_many(prompts[:n], options.sampling)
            together_s = time.perf_counter() - started
            # The answers' decode steps: the wall time left once the prefills (one after another in both) are taken out.
            steps = {"alone_steps_s": alone_s - sum(g.prefill_s for g in alone),
                     "together_steps_s": together_s - sum(g.prefill_s for g in together)}
            for key, value in {"alone_s": alone_s, "together_s": together_s, **steps}.items():
                best[key] = min(best[key], value)
        same = [a.token_ids for a in alone] == [t.token_ids for t in together]
        rows.append({"n": n, "visual": len(prompts[0][1]), "same": same, **best})
        print(f"LLM alone, N={n}: {best['alone_s']:.2f} s one after another, {best['together_s']:.2f} s together; "
              f"answer steps {best['alone_steps_s']:.2f} s vs {best['together_steps_s']:.2f} s "
              f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
