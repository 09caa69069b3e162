"""The bad-document corpus through `fila ask` and `fila batch`: the documented exit code and
error kind for each case, no traceback, no hang past the timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fila_cli.errors import ExitCode
from tests.helpers.bad_documents import write_corpus

QUESTION = "What is the total due?"
# Seconds any one case may take end to end (model load included); a hang fails the test.
CASE_TIMEOUT_S = 180
CORPUS = write_corpus  # the generator: cases are built at test time, never committed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return CORPUS(tmp_path_factory.mktemp("corpus"))


def case_names():
    # Names only (the files are written by the fixture); the generator's keys are stable.
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        return sorted(write_corpus(Path(scratch)))


# Cases that take several times the others (75 s against 10-25 s at load ~16 on 2 cores): -m "not slow" skips them.
SLOW_CASES = {"many_pages.pdf"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_CASES else name
                                  for name in case_names()])
def test_fila_ask_on_each_case(name, bundle, corpus):
    case = corpus[name]
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "ask", str(case.path), QUESTION, "--model", str(bundle),
                                "--max-tokens", "2", "--json"], capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    assert "Traceback" not in completed.stderr
    if case.expected == "ok":
        assert completed.returncode == ExitCode.OK, completed.stderr
        assert json.loads(completed.stdout)["pages"]
    else:
        assert completed.returncode == ExitCode.DOCUMENT, completed.stderr
        lines = completed.stderr.strip().splitlines()
        assert lines[-1].startswith("fila: error:") and case.path.name in lines[-1]
        failed = json.loads(completed.stdout)  # --json: the failed record, as batch writes it
        assert failed["error"]["kind"] == "document" and failed["answer"] is None


def test_fila_batch_on_the_whole_corpus(bundle, corpus, tmp_path):
    out = tmp_path / "out.jsonl"
    folder = next(iter(corpus.values())).path.parent
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "batch", str(folder), "-q", QUESTION, "--model", str(bundle),
                                "--max-tokens", "2", "--timeout", "60", "-o", str(out)],
                               capture_output=True, text=True, timeout=CASE_TIMEOUT_S * 3)
    assert completed.returncode == ExitCode.FAILURE, completed.stderr
    assert "Traceback" not in completed.stderr
    records = {Path(r["file"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == set(corpus)
    for name, case in corpus.items():
        error = records[name]["error"]
        if case.expected == "ok":
            assert error is None, (name, error)
        else:
            assert error is not None and error["kind"] == case.expected, (name, error)
