"""What replacing a crashed or timed-out document worker costs.

``fila batch`` renders documents in a spawned worker; after a crash or a timeout a fresh one
takes the next document. This times, for a fresh worker each round, the start (spawn + imports,
until the worker says it is ready) and the first document (open + render one page):

- ``documents only``: the worker as it is (PyMuPDF, Pillow, numpy);
- ``with model stack``: the same worker that first imports ``fila_cli.qa.ask`` (torch,
  transformers, timm, llama_cpp), as the worker did when it imported the model code.

Usage: python benchmarks/worker_respawn.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: fila_cli, tests.helpers

from fila_cli.config import AnyresConfig
from fila_cli.qa import isolation
from tests.helpers.bad_documents import make_good_pdf

_serve_documents_only = isolation._serve


def _serve_with_model_stack(connection, memory_budget_bytes=None) -> None:
    """The worker as it was when it imported the model code before serving."""
    import fila_cli.qa.ask  # noqa: F401  torch, transformers, timm, llama_cpp

    _serve_documents_only(connection, memory_budget_bytes)


def time_fresh_workers(serve, pdf: Path, rounds: int) -> tuple[list[float], list[float], int]:
    """(start seconds, first-document seconds) per round, and the worker's module count."""
    isolation._serve = serve
    starts, firsts, n_modules = [], [], 0
    try:
        for _ in range(rounds):
            worker = isolation.DocumentWorker(timeout_s=600, memory_budget_bytes=None)
            started = time.perf_counter()
            worker._ensure_started(pdf)
            ready = time.perf_counter()
            worker.open(pdf, "What is on the page?", None, None)
            worker.render(pdf, 0, AnyresConfig(), text_layer=False)
            starts.append(ready - started)
            firsts.append(time.perf_counter() - ready)
            n_modules = len(worker.loaded_modules())
            worker.close()
    finally:
        isolation._serve = _serve_documents_only
    return starts, firsts, n_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pdf = make_good_pdf(Path(tmp) / "page.pdf", ["Invoice 17: the total due is 310.00 EUR"])
        rows = [(name, *time_fresh_workers(serve, pdf, args.rounds))
                for name, serve in (("documents only", _serve_documents_only), ("with model stack", _serve_with_model_stack))]
    print(f"fresh document worker, {args.rounds} rounds each (median, min-max seconds)")
    print(f"{'worker':<18} {'start':>20} {'first document':>20} {'modules':>8}")
    for name, starts, firsts, n_modules in rows:
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in (starts, firsts)]
        print(f"{name:<18} {cells[0]:>20} {cells[1]:>20} {n_modules:>8}")


if __name__ == "__main__":
    main()
