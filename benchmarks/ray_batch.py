"""`fila batch --ray` pages/min with each worker's stages overlapped and one at a time, side by side in one run.

Builds, with random weights, what benchmarks/batch_pipeline.py builds: the full-size vision side
(ViT-L/14-336 mmproj, f16) and a llama-architecture GGUF LLM of --llm-width and --llm-layers, then
runs ``run_batch_on_ray`` (what `fila batch --ray local --no-cache` runs, this process the driver)
over --pages one-page scanned PDFs, on a private local cluster started for each run, with each
worker count of --workers (--ray-cpus = all CPUs / workers) in --rounds rounds of:

- overlap off: ``--pipeline-depth 0``, each worker renders, encodes and answers a document in turn;
- overlap on: ``--pipeline-depth 1``, each worker renders and encodes the next document while its
  LLM answers the current one.

It prints per-stage seconds per page (render in the document worker, encode, LLM = prefill +
generate, from the records' timings; the first record left out, as its page pays each fresh
worker's one-off warm-up), the wall time of the whole run (cluster and model start-up
included), the steady pages/min (from the first record to the last, as the workers finished them:
start-up and the pipeline's fill left out; the driver's arrival times are not used, as a record
reaches it up to seconds late, by an amount that varies when the CPUs are busy), and that rate against the bounds from the stage times measured with overlap off:
1 / (sum of the stages), what one stage at a time can reach, and 1 / (slowest stage), what perfect
overlap could reach (both per worker, times the workers).

On a CPU the encoder and the LLM of a worker share its cores: overlap gains what one stage leaves
idle (see batch_pipeline.py). State the machine's load (`uptime`) with any figure.

Usage: python benchmarks/ray_batch.py [--pages 8] [--rounds 1] [--workers 1 2] [--llm-width 2048] [--llm-layers 6]
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

from batch_pipeline import QUESTION, SECONDS_PER_MINUTE, TimedSink
from caches import write_benchmark_bundle

from fila_cli.documents.document import file_sha256
from fila_cli.llm import SamplingParams
from fila_cli.qa.options import AskOptions, BatchOptions, ModelOptions
from fila_cli.qa.ray_batch import WorkItem, run_batch_on_ray
from tests.helpers.bad_documents import make_good_pdf

MODEL_NAME = "benchmark"
DEPTHS = {"off": 0, "on": 1}


def run(model: ModelOptions, documents: list[Path], options: AskOptions, workers: int, depth: int, out: Path) -> dict:
    items = [WorkItem(str(document), file_sha256(document), [QUESTION], name=str(document)) for document in documents]
    sink = TimedSink(out)
    finished_at: list[float] = []  # when each record was ready, on the worker's clock
    started = time.perf_counter()
    try:
        batch = BatchOptions(timeout_s=600, pipeline_depth=depth, ray_address="local", ray_actors=workers,
                             ray_cpus=(os.cpu_count() or 2) / workers)
        run_batch_on_ray(items, model, options, sink, batch, model_name=MODEL_NAME,
                         on_record=lambda progress: finished_at.append(progress.finished_at))
    finally:
        sink.close()
    wall_s = time.perf_counter() - started
    failed = [r["error"] for r in sink.records if r["error"] is not None]
    if failed or len(sink.records) != len(documents):
        raise SystemExit(f"{len(failed)} of {len(sink.records)} records failed: {failed[:1]}")
    timings = [r["timings"] for r in sink.records[1:]]  # as the steady rate: the first page pays the warm-up
    return {
        "render": statistics.mean(t["render_s"] for t in timings),
        "encode": statistics.mean(t["encode_s"] for t in timings),
        "llm": statistics.mean(t["prefill_s"] + t["generate_s"] for t in timings),
        "wall": wall_s,
        "pages_per_min": SECONDS_PER_MINUTE * (len(documents) - 1) / (max(finished_at) - min(finished_at)),
        "answers": {r["file"]: r["answer"] for r in sink.records},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--llm-width", type=int, default=2048)
    parser.add_argument("--llm-layers", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bundle_dir = write_benchmark_bundle(scratch / "bundle", args.llm_width, args.llm_layers)
        docs = scratch / "docs"
        docs.mkdir()
        documents = [make_good_pdf(docs / f"scan{i:03d}.pdf", [f"Invoice {i}. Total due: {i * 17},00 EUR."],
                                   scanned_page=0) for i in range(args.pages)]
        model = ModelOptions(model=str(bundle_dir), device="cpu", use_cache=False)
        options = AskOptions(sampling=SamplingParams(max_tokens=args.max_tokens))
        configs = [(workers, overlap) for workers in args.workers for overlap in DEPTHS]
        results: dict[tuple, list[dict]] = {config: [] for config in configs}
        for round_ in range(args.rounds):  # interleaved, so that the machine's load drifts over all alike
            for config in configs:
                workers, overlap = config
                result = run(model, documents, options, workers, DEPTHS[overlap],
                             scratch / f"out-{workers}-{overlap}-{round_}.jsonl")
                results[config].append(result)
                print(f"round {round_ + 1}, {workers} worker(s), overlap {overlap}: {result['pages_per_min']:.2f} "
                      f"pages/min steady, {result['wall']:.1f} s in all (load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr, flush=True)

    print(f"{args.pages} one-page scans, full-size encoder, LLM {args.llm_width} wide x {args.llm_layers} layers, "
          f"{args.max_tokens} answer tokens, --no-cache; {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.2f}' for x in load_at_start)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end; medians of {args.rounds} round(s)")
    print("| workers | overlap | render s | encode s | LLM s | wall s (with start-up) | pages/min (steady) "
          "| 1/(sum) | 1/(slowest) | × 1/(sum) | of 1/(slowest) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for workers, overlap in configs:
        median = {key: statistics.median(r[key] for r in results[(workers, overlap)])
                  for key in ("render", "encode", "llm", "wall", "pages_per_min")}
        reference = results[(workers, "off")]  # the bounds: stage times without contention between stages
        stages = [statistics.median(r[stage] for r in reference) for stage in ("render", "encode", "llm")]
        sum_bound = workers * SECONDS_PER_MINUTE / sum(stages)
        slowest_bound = workers * SECONDS_PER_MINUTE / max(stages)
        rate = median["pages_per_min"]
        print(f"| {workers} | {overlap} | {median['render']:.2f} | {median['encode']:.2f} | {median['llm']:.2f} | "
              f"{median['wall']:.1f} | {rate:.2f} | {sum_bound:.2f} | {slowest_bound:.2f} | {rate / sum_bound:.2f} | "
              f"{rate / slowest_bound:.0%} |")
    answers = [r["answers"] for runs in results.values() for r in runs]
    print(f"answers identical in every run: {all(a == answers[0] for a in answers)}")


if __name__ == "__main__":
    main()
