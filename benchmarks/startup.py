"""`fila ask` with a tiny model: the wall time of the whole command, which is nearly all start-up.

Issue 13's goal: <= 2.5 s on the 2-core CPU. The tiny bundle (tests/helpers/tiny_bundle.py) makes the
model's own work negligible, so the time is Python, imports, model files and the CLI. Rows, run
interleaved ``--repeats`` times (median kept), side by side in one run:

- ``python -c pass`` and ``python -c "import torch"``: the floor every fila command pays;
- the modules ``fila ask`` imports before it opens a model, then the whole ``fila ask`` (fusion
  off, caches off, 4-token answer), from this checkout and from each ``--compare`` checkout (e.g.
  the main branch's worktree), so before/after is one ratio.

Usage: python benchmarks/startup.py [--repeats 5] [--compare /path/to/other/checkout ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout: fila_cli, tests.helpers

QUESTION = "What is the total due?"
# What `fila ask` imports before it opens a model (the command's own hook first, where it has one).
ASK_IMPORTS = ("import fila_cli.cli.app as app; getattr(app, '_skip_pymupdf_addons', lambda: None)(); "
               "import fila_cli.cli.ask, fila_cli.qa.ask, fila_cli.vision.load, fila_cli.llm.backend")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], pythonpath: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system, every thread) of one run of ``command``."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    # cwd is the checkout: `python -m` and `-c` put the working directory first on sys.path, ahead
    # of PYTHONPATH, so running from another checkout would time that one instead.
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=pythonpath, check=False)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({pythonpath}):\n{completed.stderr[-2000:]}")
    return elapsed, _children_cpu_s() - cpu_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other checkouts of fila to time beside this one")
    args = parser.parse_args()
    from tests.helpers.bad_documents import make_good_pdf
    from tests.helpers.tiny_bundle import build_tiny_bundle

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bundle = build_tiny_bundle(scratch / "bundle")
        pdf = make_good_pdf(scratch / "page.pdf", ["Invoice 2291. Total due: 1,234.00 EUR."])
        ask = [sys.executable, "-m", "fila_cli", "ask", str(pdf), QUESTION, "--model", str(bundle), "--json",
               "--no-cache", "--max-tokens", "4"]
        rows = {"python -c pass": ([sys.executable, "-c", "pass"], ROOT),
                "python -c 'import torch'": ([sys.executable, "-c", "import torch"], ROOT)}
        for checkout in (ROOT, *(other.resolve() for other in args.compare)):
            rows[f"fila ask's imports ({checkout.name})"] = ([sys.executable, "-c", ASK_IMPORTS], checkout)
            rows[f"fila ask ({checkout.name})"] = (ask, checkout)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, (command, pythonpath) in rows.items():  # interleaved: load drifts hit every row alike
                times[name].append(timed(command, pythonpath))
    this = statistics.median(wall for wall, _ in times[f"fila ask ({ROOT.name})"])
    print(f"median of {args.repeats} runs (interleaved); CPU s = user + system time of the process; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'command':<40} {'wall s':>7} {'min wall s':>10} {'CPU s':>6} {'wall / this fila ask':>21}")
    for name, values in times.items():
        wall = statistics.median(w for w, _ in values)
        print(f"{name:<40} {wall:7.2f} {min(w for w, _ in values):10.2f} {statistics.median(c for _, c in values):6.2f} "
              f"{wall / this:21.2f}")


if __name__ == "__main__":
    main()
