"""A worker that dies under a document becomes that document's `crash`; the next one gets a fresh worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fila_cli.config import AnyresConfig
from fila_cli.errors import DocumentError, UsageError
from fila_cli.qa.isolation import DocumentWorker, WorkerFailure
from tests.helpers.bad_documents import make_good_pdf


def test_a_crashed_worker_is_reported_and_replaced(tmp_path):
    pdf = make_good_pdf(tmp_path / "a.pdf", ["First page", "Second page"])
    worker = DocumentWorker(timeout_s=120)
    try:
        plan = worker.open(pdf, "What is on the second page?", "1-2", None)
        assert plan.page_indices == [0, 1]
        # The PDF library segfaults in the middle of the document:
        os.kill(worker._process.pid, signal.SIGSEGV)
        with pytest.raises(WorkerFailure) as failure:
            worker.render(pdf, 1, AnyresConfig(), text_layer=False)
        assert failure.value.kind == "crash" and "a.pdf" in str(failure.value)
        # The next document is served by a new worker.
        plan = worker.open(pdf, "Anything?", "2", None)
        page = worker.render(pdf, plan.page_indices[0], AnyresConfig(), text_layer=True)
        assert page.index == 1 and "Second page" in page.text and page.image.size[0] > 0
    finally:
        worker.close()


# Heavy stacks the worker must never import: a respawn would pay for them on every crash or timeout.
MODEL_STACK = ("torch", "transformers", "timm", "llama_cpp")


def test_model_time_between_renders_does_not_count_against_the_timeout(tmp_path):
    # Six pages, each answered slowly by the model between renders. Each render takes far less
    # than the budget and all six together less too, but the model time alone exceeds it.
    timeout_s, model_time_s, n_pages = 2.0, 0.6, 6
    pdf = make_good_pdf(tmp_path / "six.pdf", [f"Page {n}" for n in range(1, n_pages + 1)])
    worker = DocumentWorker(timeout_s=timeout_s)
    try:
        plan = worker.open(pdf, "Anything?", f"1-{n_pages}", None)
        rendered = []
        started = time.monotonic()
        for index in plan.page_indices:
            time.sleep(model_time_s)  # the encoder and the LLM at work in the parent
            page = worker.render(pdf, index, AnyresConfig(), text_layer=True)
            assert page.render_s < timeout_s / n_pages  # the premise: rendering is a small part
            rendered.append(page.text.strip())
        assert rendered == [f"Page {n}" for n in range(1, n_pages + 1)]
        # The premise, measured: more than the budget went by, so a wall-clock deadline would have fired.
        assert time.monotonic() - started > timeout_s
    finally:
        worker.close()


def test_the_budget_still_stops_a_worker_that_hangs(tmp_path):
    pdf = make_good_pdf(tmp_path / "a.pdf", ["Only page"])
    worker = DocumentWorker(timeout_s=1.0)
    try:
        worker.open(pdf, "Anything?", None, None)
        os.kill(worker._process.pid, signal.SIGSTOP)  # the PDF library hangs
        started = time.monotonic()
        with pytest.raises(WorkerFailure) as failure:
            worker.render(pdf, 0, AnyresConfig(), text_layer=False)
        assert failure.value.kind == "timeout" and time.monotonic() - started < 5.0
    finally:
        worker.close()


@pytest.mark.parametrize("pages, error", [("1,,2", UsageError), ("9", DocumentError)])
def test_the_worker_keeps_the_error_kind(tmp_path, pages, error):
    pdf = make_good_pdf(tmp_path / "a.pdf", ["First page", "Second page"])
    worker = DocumentWorker(timeout_s=120)
    try:
        with pytest.raises(error) as raised:
            worker.open(pdf, "Anything?", pages, None)
        assert type(raised.value) is error and raised.value.kind == error.kind
    finally:
        worker.close()


def test_the_worker_imports_no_model_code(tmp_path):
    # As the `fila` console script runs it: spawn re-imports the main script (the CLI) in the child.
    pdf = make_good_pdf(tmp_path / "a.pdf", ["Only page"])
    script = tmp_path / "fila_like.py"
    script.write_text(textwrap.dedent(f"""
        from fila_cli.cli.app import main  # what the console script imports
        from pathlib import Path
        from fila_cli.config import AnyresConfig
        from fila_cli.qa.isolation import DocumentWorker

        if __name__ == "__main__":
            worker = DocumentWorker(timeout_s=120)
            worker.open(Path({str(pdf)!r}), "Anything?", None, None)
            worker.render(Path({str(pdf)!r}), 0, AnyresConfig(), text_layer=True)
            print(" ".join(worker.loaded_modules()))
            worker.close()
    """))
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    top_level = {name.split(".")[0] for name in completed.stdout.split()}
    assert "pymupdf" in top_level and "PIL" in top_level  # the probe sees the worker's imports
    assert not set(MODEL_STACK) & top_level


ORPHANED_PARENT = """
import sys, time
from pathlib import Path
from fila_cli.qa.isolation import DocumentWorker
worker = DocumentWorker(timeout_s=120)
worker.open(Path(sys.argv[1]), "Anything?", None, None)
print(worker._process.pid, flush=True)
time.sleep(600)  # killed with -9 here, its worker left waiting for the next request
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_whose_parent_is_killed_exits_quietly_and_promptly(tmp_path):
    pdf = make_good_pdf(tmp_path / "a.pdf", ["Only page"])
    parent = subprocess.Popen([sys.executable, "-c", ORPHANED_PARENT, str(pdf)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait(timeout=30)
    killed_at = time.monotonic()
    # The worker shares the parent's stderr: the pipe ends when the worker has exited too.
    stderr = parent.stderr.read()
    waited = time.monotonic() - killed_at
    assert "Traceback" not in stderr and "EOFError" not in stderr, stderr
    assert waited < 10.0, f"the orphaned worker lingered {waited:.1f} s"
    assert _exited(worker_pid)


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever adopted it to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
