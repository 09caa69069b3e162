"""A document is opened once for all its questions: one ``--timeout`` budget, and a document that
crashes the PDF library crashes one worker, however many questions ask about it. Real PyMuPDF in
real worker processes, the real tiny model; the faults are a real slow PDF and a real SIGSEGV."""

from __future__ import annotations

import os
import signal

import pytest

from fila_cli.bundles.bundle import resolve_bundle
from fila_cli.llm.sampling import SamplingParams
from fila_cli.qa.ask import Asker, AskOptions
from fila_cli.qa.batch import answer_document, sha256_or_none
from fila_cli.qa.isolation import DocumentWorker
from tests.helpers.bad_documents import BOMB_SIDE, _bomb_deflate, _bomb_pdf, make_good_pdf

OPTIONS = AskOptions(sampling=SamplingParams(max_tokens=2))
QUESTIONS = ["What is the total due?", "Who signed the letter?", "What is the date?"]


@pytest.fixture(scope="module")
def asker(bundle):
    return Asker.load(resolve_bundle(str(bundle)))


class CountingWorker(DocumentWorker):
    """The real worker, counting the processes it starts (each one pays a start and a fresh budget)."""

    def __init__(self, *args, segfault_on_render: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts = 0
        self.segfault_on_render = segfault_on_render

    def _wait_ready(self, file):
        self.starts += 1
        super()._wait_ready(file)

    def render(self, file, index, *args, **kwargs):
        if self.segfault_on_render:  # the PDF library crashes on this document's page
            os.kill(self._process.pid, signal.SIGSEGV)
        return super().render(file, index, *args, **kwargs)


def test_a_slow_document_with_several_questions_costs_one_timeout_budget(asker, tmp_path):
    slow = tmp_path / "slow.pdf"
    slow.write_bytes(_bomb_pdf(BOMB_SIDE, _bomb_deflate(BOMB_SIDE)))  # seconds of MuPDF work to render
    worker = CountingWorker(timeout_s=0.5)
    try:
        records = answer_document(asker, worker, slow, sha256_or_none(slow), QUESTIONS, OPTIONS)
    finally:
        worker.close()
    assert [r["error"]["kind"] for r in records] == ["timeout"] * len(QUESTIONS)
    assert worker.starts == 1, "the budget was spent once, not once per question"


def test_a_document_that_crashes_the_worker_crashes_one(asker, tmp_path):
    pdf = make_good_pdf(tmp_path / "crashes.pdf", ["The total due is 310.00 EUR"])
    good = make_good_pdf(tmp_path / "good.pdf", ["Signed by Ada Lovelace"])
    worker = CountingWorker(timeout_s=120, segfault_on_render=True)
    try:
        records = answer_document(asker, worker, pdf, sha256_or_none(pdf), QUESTIONS, OPTIONS)
        assert [r["error"]["kind"] for r in records] == ["crash"] * len(QUESTIONS)
        assert all("crashes.pdf" in r["error"]["message"] for r in records)
        assert worker.starts == 1, "one worker crashed, not one per question"
        worker.segfault_on_render = False
        after = answer_document(asker, worker, good, sha256_or_none(good), QUESTIONS, OPTIONS)
        assert all(r["error"] is None for r in after) and worker.starts == 2, "the next document gets a fresh worker"
    finally:
        worker.close()


def test_pages_that_several_questions_read_are_rendered_once(asker, tmp_path):
    pdf = make_good_pdf(tmp_path / "two.pdf", ["The total due is 310.00 EUR", "Signed by Ada Lovelace"])
    renders = []

    class RenderCounting(DocumentWorker):
        def render(self, file, index, *args, **kwargs):
            renders.append(index)
            return super().render(file, index, *args, **kwargs)

    worker = RenderCounting(timeout_s=120)
    try:
        options = AskOptions(pages="1-2", sampling=SamplingParams(max_tokens=2))
        records = answer_document(asker, worker, pdf, sha256_or_none(pdf), QUESTIONS, options)
    finally:
        worker.close()
    assert all(r["error"] is None for r in records)
    assert sorted(renders) == [0, 1], "each page rendered (and encoded) once for the three questions"
