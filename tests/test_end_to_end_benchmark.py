"""benchmarks/end_to_end.py runs end to end (--small: a tiny LLM and vision tower) and prints
every row of its table: fila's stages, the real CLI's wall time, `fila batch` pages/min and
llama.cpp's own multimodal pipeline (mtmd) on the same page and weights."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "end_to_end.py"
NUMBER = r"\d+\.\d+"


@pytest.mark.slow  # 99 s at load ~16 on 2 cores: the whole benchmark, small
def test_the_small_end_to_end_benchmark_prints_its_whole_table(tmp_path):
    env = {**os.environ, "FILA_BENCH_CACHE": str(tmp_path / "bench"), "FILA_CACHE_DIR": str(tmp_path / "cache")}
    completed = subprocess.run([sys.executable, str(SCRIPT), "--small", "--batch-pages", "1", "--max-tokens", "2"],
                               capture_output=True, text=True, env=env, timeout=900)  # seconds on an idle CPU; minutes on a shared one
    assert completed.returncode == 0, completed.stderr[-3000:]
    table = completed.stdout
    assert "2256 visual tokens" in table  # an A4 page on LLaVA-1.6's canvases
    for stage in ("start-up", "model load", "render", "preprocess", "encode", "LLM prefill", "first token",
                  "whole answer"):
        assert re.search(rf"^fila: {stage} +{NUMBER} ", table, re.MULTILINE), (stage, table)
    assert re.search(rf"^fila ask: process wall time +{NUMBER} ", table, re.MULTILINE), table
    assert re.search(rf"^fila batch: pages/min \(1 pages\) +{NUMBER} ", table, re.MULTILINE), table
    # llama.cpp's pipeline runs the tests' mmproj; if a future llama.cpp refuses it, the row says why.
    assert re.search(rf"^mtmd: encode \+ prefill +({NUMBER}|n/a: \S.*) ", table, re.MULTILINE), table
    import torch

    if not torch.cuda.is_available():
        assert re.search(r"^fila: encode +\S+ +n/a$", table, re.MULTILINE), table
