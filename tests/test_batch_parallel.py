"""`fila batch --parallel N`: several documents' questions answered side by side in one llama.cpp
context, with the one-at-a-time batch's records, in its order, each exactly once across kill -9 and
--resume. Real llama.cpp, real PyMuPDF in the document worker, the tiny bundle; no mocks.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from typer.testing import CliRunner

from fila_cli.bundles.bundle import resolve_bundle
from fila_cli.cli.app import app
from fila_cli.errors import ExitCode
from fila_cli.llm import LlamaSettings, SamplingParams
from fila_cli.qa.ask import Asker, AskOptions
from fila_cli.qa.batch import run_batch
from fila_cli.qa.options import BatchOptions
from fila_cli.qa.run import RecordSink
from tests.helpers.bad_documents import make_good_pdf
from tests.test_batch import read_records
from tests.test_batch_pipeline import PORTRAIT, WIDE, kill_twice_then_resume, shaped_pdf

N = 3
QUESTIONS = ["What is the total due?", "Who signed the letter?"]
MAX_TOKENS = 4
# The groups' steps run without flash attention here: with it, llama.cpp's CPU build computes a step
# of several sequences with another attention kernel than a step of one, and after a page's 2,000+
# visual tokens this tiny random LLM's near-tied candidates flip (generate_many's docstring). Without
# it a batched step's logits are one sequence's to rounding
# (test_llm_parallel.test_without_flash_attention_...); confidences are exp(mean log-probability).
CONFIDENCE_RTOL = 1e-3


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """Seven documents: one-page scans of different shapes and texts, a broken one, a missing one,
    and one of two pages without a text layer (read page by page: the one-at-a-time path)."""
    folder = tmp_path_factory.mktemp("documents")
    for i in range(3):
        make_good_pdf(folder / f"scan{i}.pdf", [f"Scan number {i}, total due {i * 10} EUR"], scanned_page=0)
    shaped_pdf(folder / "wide.pdf", [WIDE])
    (folder / "notes.pdf").write_text("a text file with a .pdf name")
    shaped_pdf(folder / "two_pages.pdf", [WIDE, WIDE])  # together, the two fit the context
    shaped_pdf(folder / "portrait.pdf", [PORTRAIT])
    names = ["scan0.pdf", "wide.pdf", "notes.pdf", "scan1.pdf", "two_pages.pdf", "missing.pdf", "portrait.pdf", "scan2.pdf"]
    return [folder / name for name in names]


def load_asker(bundle, n_seq_max, **settings) -> Asker:
    """The tiny model without caches; flash attention off (see CONFIDENCE_RTOL)."""
    return Asker.load(resolve_bundle(str(bundle)), reuse_prefix=True,
                      llama_settings=LlamaSettings(n_seq_max=n_seq_max, flash_attn=False, **settings))


def spy_on_groups(asker):
    """Record the size of every answer_many call (the real method runs)."""
    sizes = []
    answer_many = asker.answer_many

    def counted(questions, options):
        sizes.append(len(questions))
        return answer_many(questions, options)

    asker.answer_many = counted
    return sizes


def batch_records(asker, documents, options, tmp_path, name, **kwargs):
    out = tmp_path / f"{name}.jsonl"
    sink = RecordSink(out)
    try:
        summary = run_batch(asker, documents, QUESTIONS, options, sink, BatchOptions(**kwargs))
    finally:
        sink.close()
    assert not summary.interrupted
    return read_records(out)


def assert_same_records(records, reference):
    assert len(records) == len(reference)
    for record, expected in zip(records, reference):
        record, expected = dict(record), dict(expected)
        record.pop("timings"), expected.pop("timings")
        confidence, expected_confidence = record.pop("confidence"), expected.pop("confidence")
        assert record == expected
        assert (confidence is None) == (expected_confidence is None)
        if confidence is not None:
            assert confidence == pytest.approx(expected_confidence, rel=CONFIDENCE_RTOL)


@pytest.mark.parametrize("options", [
    AskOptions(sampling=SamplingParams(max_tokens=MAX_TOKENS)),
    AskOptions(together=True, text_layer=True, sampling=SamplingParams(max_tokens=MAX_TOKENS)),
], ids=["pages", "together-text-layer"])
def test_parallel_records_equal_one_at_a_time(bundle, documents, tmp_path, options):
    reference = batch_records(load_asker(bundle, 1), documents, options, tmp_path, "one", pipeline_depth=0)
    asker = load_asker(bundle, N)
    sizes = spy_on_groups(asker)
    # Without overlap the groups fill deterministically: each takes the next units that one prompt answers.
    grouped = batch_records(asker, documents, options, tmp_path, "grouped", pipeline_depth=0, parallel=N)
    assert_same_records(grouped, reference)
    assert max(sizes) == N and len(sizes) < sum(sizes), sizes
    # With overlap, the groups are what the preparing thread has ready: the same records.
    overlapped = batch_records(asker, documents, options, tmp_path, "overlapped", parallel=N)
    assert_same_records(overlapped, reference)
    # The premises: answers to compare, failures in their places, the two-page document read.
    kinds = Counter(record["error"]["kind"] if record["error"] else None for record in reference)
    assert kinds["document"] == 2 * len(QUESTIONS), kinds  # notes.pdf, missing.pdf
    assert kinds[None] == 6 * len(QUESTIONS), kinds
    two_pages = [record for record in reference if record["file"].endswith("two_pages.pdf")]
    if options.together:  # one prompt: in a group
        assert all(record["pages"] == [1, 2] for record in two_pages)
    else:
        assert all(record["page_choice"]["method"] == "all pages, most confident" for record in two_pages)
    assert len({record["answer"] for record in reference if record["error"] is None}) > 1


def test_a_prompt_past_the_context_is_the_one_at_a_time_record(bundle, documents, tmp_path):
    # A context between a wide page's tokens and a portrait page's: the portrait pages fail, in the
    # middle of groups, with the one-at-a-time path's message.
    options = AskOptions(sampling=SamplingParams(max_tokens=MAX_TOKENS))

    def asker(n_seq_max):  # a fixed context (--ctx-size), which never grows for a prompt
        return Asker.load(resolve_bundle(str(bundle)), reuse_prefix=True, ctx_size=2200,
                          llama_settings=LlamaSettings(n_seq_max=n_seq_max, flash_attn=False))

    reference = batch_records(asker(1), documents, options, tmp_path, "one", pipeline_depth=0)
    grouped = batch_records(asker(N), documents, options, tmp_path, "grouped", pipeline_depth=0, parallel=N)
    assert_same_records(grouped, reference)
    portrait = [record for record in reference if record["file"].endswith("portrait.pdf")]
    assert [record["error"]["kind"] for record in portrait] == ["model"] * len(QUESTIONS)


def test_kill_9_with_parallel_then_resume_gives_each_record_once(bundle, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(8):
        make_good_pdf(folder / f"scan{i:02d}.pdf", [f"Scan number {i}, total due {i * 10} EUR"], scanned_page=0)
    (folder / "aaa_broken.pdf").write_text("not a PDF")  # a failed record, tried again on --resume
    questions = ["-q", QUESTIONS[0], "-q", QUESTIONS[1]]
    n_units = 9 * len(QUESTIONS)
    # One answer token: it comes from each prompt's own prefill, the same alone or in a group
    # (whatever the attention kernel), so the records must equal the reference's exactly.
    def one_token_batch(*args):
        return [sys.executable, "-m", "fila_cli", "batch", *map(str, args), "--model", str(bundle), "--max-tokens", "1"]

    reference_out = tmp_path / "reference.jsonl"
    subprocess.run(one_token_batch(folder, *questions, "-o", reference_out, "--no-cache"), capture_output=True, timeout=600)
    reference = read_records(reference_out)
    assert len(reference) == n_units

    out = tmp_path / "out.jsonl"
    kill_twice_then_resume(one_token_batch(folder, *questions, "-o", out, "--no-cache", "--parallel", N), out, reference)


@pytest.mark.parametrize("args, message", [
    (["--parallel", "0"], "--parallel must be at least 1"),
    (["--parallel", "3", "--pipeline-depth", "2"], "--pipeline-depth 2 is less than --parallel 3"),
    (["--parallel", "2", "--ray", "local"], "--parallel is for one machine"),
])
def test_parallel_usage_errors(bundle, documents, args, message):
    result = CliRunner().invoke(app, ["batch", str(documents[0]), "-q", "x", "--model", str(bundle), *args])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert message in result.output
