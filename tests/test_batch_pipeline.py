"""`fila batch` with its stages overlapped (pages rendered and encoded while the LLM answers):
the same records as one stage at a time, each exactly once, across kill -9 and --resume.

Real llama.cpp, real PyMuPDF in the document worker, the tiny bundle; the overlap is real threads.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import threading
import time
from collections import Counter

import pymupdf
import pytest

from fila_cli.bundles.bundle import resolve_bundle
from fila_cli.errors import ExitCode
from fila_cli.qa.ask import Asker, AskOptions
from fila_cli.qa.batch import answer_document, run_batch, sha256_or_none
from fila_cli.qa.document_pipeline import DocumentPipeline
from fila_cli.qa.isolation import DocumentWorker
from fila_cli.qa.options import BatchOptions
from fila_cli.qa.pipeline import RunAhead
from fila_cli.qa.run import RecordSink
from tests.helpers.bad_documents import make_good_pdf
from tests.test_batch import batch_command, read_records, wait_for_lines

QUESTIONS = ["What is the total due?", "Who signed the letter?"]
# Page shapes (points) whose renders make different numbers of visual tokens with the tiny bundle:
# a wide page ~1,900, a portrait one ~2,450. A context or token limit between them fails the
# portrait pages alone, in the middle of a document.
WIDE, PORTRAIT = (1600, 400), (612, 792)
BETWEEN_THE_SHAPES = 2200


# -- RunAhead on its own --


def test_run_ahead_keeps_the_order_and_stays_within_its_depth():
    made, taken = [], []
    lock = threading.Lock()

    def numbers():
        for n in range(50):
            with lock:
                made.append(n)
                assert len(made) - len(taken) <= 2 + 1, "made more than depth ahead of the reader"
            yield n

    received = []
    with RunAhead(numbers(), depth=2) as ahead:
        for n in ahead:
            with lock:
                taken.append(n)
            received.append(n)
            time.sleep(0.002)  # a slow reader: the producer waits for room
    assert received == list(range(50))


def test_run_ahead_works_ahead_while_the_reader_is_busy():
    started = threading.Event()

    def items():
        yield "first"
        started.set()  # asked for the second item while the reader still holds the first
        yield "second"

    with RunAhead(items(), depth=1) as ahead:
        assert next(ahead) == "first"
        assert started.wait(10), "the producer did not work ahead"
        assert next(ahead) == "second"
        with pytest.raises(StopIteration):
            next(ahead)


def test_run_ahead_raises_the_generators_error_in_place():
    def items():
        yield 1
        raise KeyError("broken")

    ahead = RunAhead(items(), depth=1)
    assert next(ahead) == 1
    with pytest.raises(KeyError, match="broken"):
        next(ahead)
    ahead.close()


def test_close_stops_the_producer_and_runs_the_generators_clean_up():
    cleaned = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            cleaned.set()

    ahead = RunAhead(endless(), depth=1)
    assert next(ahead) == 0
    ahead.close()
    assert cleaned.is_set() and not ahead._thread.is_alive()
    with pytest.raises(StopIteration):
        next(ahead)
    with pytest.raises(ValueError):
        RunAhead(iter(()), depth=0)


# -- the batch, in this process --


def shaped_pdf(path, shapes):
    """A PDF of blank pages of the given sizes: no text layer, so every page is read."""
    document = pymupdf.open()
    for width, height in shapes:
        page = document.new_page(width=width, height=height)
        page.draw_rect(pymupdf.Rect(20, 20, width / 2, height / 2), color=(0, 0, 0), fill=(0.3, 0.5, 0.7))
    document.save(path)
    return path


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("documents")
    make_good_pdf(folder / "invoice.pdf", ["Invoice 17", "The total due is 310.00 EUR"])
    shaped_pdf(folder / "shapes.pdf", [WIDE, PORTRAIT, WIDE])  # its middle page is the big one
    (folder / "notes.pdf").write_text("a text file with a .pdf name")
    shaped_pdf(folder / "wide.pdf", [WIDE])  # answered whatever the limits: the batch is back in step
    return [folder / "invoice.pdf", folder / "shapes.pdf", folder / "missing.pdf", folder / "notes.pdf",
            folder / "wide.pdf"]


def load_asker(bundle, **limits) -> Asker:
    """The tiny model without caches (every page rendered and encoded), with bundle limits replaced; a
    replaced n_ctx is fixed (the context would otherwise grow to fit, as prompts need)."""
    return Asker.load(dataclasses.replace(resolve_bundle(str(bundle)), **limits), reuse_prefix=True,
                      ctx_size=limits.get("n_ctx"))


def batch_records(asker, documents, options, depth, tmp_path):
    out = tmp_path / f"depth{depth}.jsonl"
    sink = RecordSink(out)
    try:
        summary = run_batch(asker, documents, QUESTIONS, options, sink, BatchOptions(pipeline_depth=depth))
    finally:
        sink.close()
    assert not summary.interrupted
    return read_records(out)


def without_timings(records):
    return [{key: value for key, value in record.items() if key != "timings"} for record in records]


@pytest.mark.parametrize("limits, options, depths", [
    ({}, AskOptions(), (1, 2)),
    # The portrait page overflows the LLM's context: a failure in the LLM's stage, with a page of
    # the document still coming from the other thread.
    ({"n_ctx": BETWEEN_THE_SHAPES}, AskOptions(), (1,)),
    # The portrait page makes more visual tokens than the bundle allows: a failure in the encoding
    # stage, after a page of the document was already handed over.
    ({"max_visual_tokens": BETWEEN_THE_SHAPES}, AskOptions(), (1,)),
    ({}, AskOptions(together=True, text_layer=True), (1,)),
], ids=["pages-alone", "context-overflow-mid-document", "token-limit-mid-document", "together-text-layer"])
def test_overlapped_records_equal_one_stage_at_a_time(bundle, documents, tmp_path, limits, options, depths):
    asker = load_asker(bundle, **limits)
    reference = batch_records(asker, documents, options, 0, tmp_path)
    assert len(reference) == len(documents) * len(QUESTIONS)
    for depth in depths:
        overlapped = batch_records(asker, documents, options, depth, tmp_path)
        assert without_timings(overlapped) == without_timings(reference), f"depth {depth}"
    # The premises: answers to compare, and with the limits, a document that fails on its middle page.
    answered = Counter(record["file"].rsplit("/", 1)[-1] for record in reference if record["error"] is None)
    assert answered["wide.pdf"] == len(QUESTIONS)
    if limits:
        shapes = [record for record in reference if record["file"].endswith("shapes.pdf")]
        assert [record["error"]["kind"] for record in shapes] == ["model"] * len(QUESTIONS), shapes
    elif options.together:  # several big pages together overflow the context; one page fits
        assert answered["invoice.pdf"] >= 1
    else:
        assert answered["invoice.pdf"] == answered["shapes.pdf"] == len(QUESTIONS)
    encoded = Counter()
    for record in reference:
        if record["error"] is None:
            assert record["timings"]["prefill_s"] > 0
            encoded[record["file"]] += record["timings"]["encode_s"] > 0
    # Without a cache each page is encoded once for all the questions that read it: by the first.
    assert all(count >= 1 for count in encoded.values()), encoded


# -- kill -9 while the stages overlap, then --resume --


def scans(tmp_path, n=8):
    """One-page documents without a text layer: each one rendered, encoded and answered."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(n):
        make_good_pdf(folder / f"scan{i:02d}.pdf", [f"Scan number {i}, total due {i * 10} EUR"], scanned_page=0)
    return folder


def kill_after(command, out, n_records):
    """Start the batch, kill -9 it as soon as ``out`` holds ``n_records`` lines, return how many it wrote."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lines(out, n_records, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    return out.read_text().count("\n")


def test_kill_9_during_overlap_then_resume_gives_each_record_once(bundle, tmp_path):
    folder = scans(tmp_path)
    (folder / "aaa_broken.pdf").write_text("not a PDF")  # a failed record, tried again on --resume
    questions = ["-q", QUESTIONS[0], "-q", QUESTIONS[1]]
    n_units = 9 * len(QUESTIONS)
    reference_out = tmp_path / "reference.jsonl"
    subprocess.run(batch_command(bundle, folder, *questions, "-o", reference_out, "--no-cache", "--pipeline-depth", "0"),
                   capture_output=True, timeout=600)
    reference = read_records(reference_out)
    assert len(reference) == n_units

    out = tmp_path / "out.jsonl"
    # The next page is being encoded ahead at each kill.
    kill_twice_then_resume(batch_command(bundle, folder, *questions, "-o", out, "--no-cache", "--pipeline-depth", "1"),
                           out, reference)


def kill_twice_then_resume(command, out, reference):
    """kill -9 the batch ``command`` twice (after 3 records, then 4 more), finish it with --resume; the
    output then holds each (document, question) once, equal to ``reference`` but for the timings. One
    document of the batch is broken (its record fails again on every --resume)."""
    n_units = len(reference)
    written = kill_after(command, out, 3)
    assert written < n_units
    written = kill_after(command + ["--resume"], out, written + 4)
    assert written < n_units, "the batch finished before the second kill"
    completed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.FAILURE, completed.stderr  # the broken document fails again

    records = read_records(out)  # every line a whole record
    keys = Counter((record["file"], record["question"]) for record in records)
    assert len(keys) == n_units and set(keys.values()) == {1}, "each (document, question) exactly once"

    def by_key(records):
        return {(r["file"], r["question"]): {k: v for k, v in r.items() if k != "timings"} for r in records}

    assert by_key(records) == by_key(reference), "the interrupted, resumed batch answers as the uninterrupted one"


# -- one pipeline fed by several threads (what a `fila batch --ray` worker runs) --


def pipeline_records(asker, documents, options, depth):
    """Each document submitted from its own thread, all at once: its records, by document."""
    worker = DocumentWorker(120)
    pipeline = DocumentPipeline(asker, worker, options, depth)
    results = {}

    def submit(document):
        results[document] = pipeline.submit(document, sha256_or_none(document), QUESTIONS)

    threads = [threading.Thread(target=submit, args=(document,)) for document in documents]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    finally:
        pipeline.close()
        worker.close()
    assert not any(thread.is_alive() for thread in threads)
    return results


@pytest.mark.parametrize("limits", [{}, {"n_ctx": BETWEEN_THE_SHAPES}], ids=["pages-alone", "context-overflow-mid-document"])
def test_a_pipeline_fed_by_threads_answers_each_document_as_answer_document_does(bundle, documents, limits):
    asker = load_asker(bundle, **limits)
    worker = DocumentWorker(120)
    try:
        reference = {document: answer_document(asker, worker, document, sha256_or_none(document), QUESTIONS, AskOptions())
                     for document in documents}
    finally:
        worker.close()
    for depth in (1, 2):
        got = pipeline_records(asker, documents, AskOptions(), depth)
        assert {d: without_timings(r) for d, r in got.items()} == {d: without_timings(r) for d, r in reference.items()}
    # The premises: answers to compare, and failures before the LLM (missing, not a PDF) and with it.
    kinds = Counter(record["error"]["kind"] if record["error"] else None for records in reference.values() for record in records)
    assert kinds[None] >= len(QUESTIONS) and kinds["document"] == 2 * len(QUESTIONS), kinds
    assert ("model" in kinds) == bool(limits)


def test_a_pipeline_prepares_the_next_document_while_the_llm_answers(bundle, documents):
    """The LLM's first answer waits until the next document is being opened: without overlap that
    never happens (the wait times out and the test fails)."""
    first, second = documents[4], documents[0]  # wide.pdf (one page), invoice.pdf
    asker = load_asker(bundle)
    worker = DocumentWorker(120)
    opened = {first: threading.Event(), second: threading.Event()}
    second_opened_during_first_answer = []
    real_open, real_answer = worker.open_for, asker.answer_prepared

    def open_and_tell(file, *args, **kwargs):
        opened[file].set()
        return real_open(file, *args, **kwargs)

    def answer_after_the_next_opened(file, *args, **kwargs):
        if file == str(first):
            second_opened_during_first_answer.append(opened[second].wait(60))
        return real_answer(file, *args, **kwargs)

    worker.open_for, asker.answer_prepared = open_and_tell, answer_after_the_next_opened
    pipeline = DocumentPipeline(asker, worker, AskOptions(), depth=1)
    results = {}

    def submit(document):
        results[document] = pipeline.submit(document, sha256_or_none(document), QUESTIONS[:1])

    try:
        thread = threading.Thread(target=submit, args=(first,))
        thread.start()
        assert opened[first].wait(60)  # in the queue first
        submit(second)
        thread.join(120)
    finally:
        pipeline.close()
        worker.close()
    assert second_opened_during_first_answer == [True]
    assert [record["error"] for document in (first, second) for record in results[document]] == [None, None]
