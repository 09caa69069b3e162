"""Questions across pages (`--together`), honest warnings for damaged documents, `page_choice` in
the JSON, and `fila sample`: tiny models, real llama.cpp, real PyMuPDF."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pymupdf
import pytest

from fila_cli.bundles.bundle import resolve_bundle
from fila_cli.errors import ExitCode
from fila_cli.llm import ContextOverflowError, LlamaBackend, SamplingParams
from fila_cli.qa.ask import Asker, AskOptions, page_label
from tests.helpers.bad_documents import make_good_pdf, write_corpus
from tests.helpers.tiny_bundle import LLM_FILE, build_tiny_bundle
from tests.helpers.tiny_llm import build_tiny_llm
from tests.helpers.tiny_vision import TINY_LLM_WIDTH

OPTIONS = AskOptions(pages="1,3", together=True, sampling=SamplingParams(max_tokens=6))
# A Letter page makes 2,448 tiny visual tokens: two need more than the bundle's 4,096 positions.
TWO_PAGES_CONTEXT = 5200
QUESTION = "What changed between the pages?"


@pytest.fixture(scope="module")
def long_bundle(tmp_path_factory):
    """The same bundle with an LLM trained (as its GGUF says) for a context that holds two pages."""
    directory = build_tiny_bundle(tmp_path_factory.mktemp("long-bundle"))
    build_tiny_llm(directory / LLM_FILE, n_embd=TINY_LLM_WIDTH, n_ctx_train=2 * TWO_PAGES_CONTEXT)
    return directory


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return make_good_pdf(tmp_path_factory.mktemp("docs") / "report.pdf",
                         ["Prices in 2023: 10 EUR", "Nothing here", "Prices in 2024: 12 EUR"])


class RecordingBackend(LlamaBackend):
    """The real backend, remembering the segments of every prefill (nothing is replaced)."""

    prompts: list

    def prefill(self, segments, *, append=False):
        self.prompts.append(list(segments))
        return super().prefill(segments, append=append)


def test_together_puts_both_pages_in_one_prompt_each_after_its_label(long_bundle, report):
    loaded = resolve_bundle(str(long_bundle))
    asker = Asker.load(dataclasses.replace(loaded, n_ctx=TWO_PAGES_CONTEXT), device="cpu", dtype="float32")
    backend = asker.backend
    backend.__class__ = RecordingBackend
    backend.prompts = []
    answer = asker.ask(report, QUESTION, OPTIONS)
    assert answer.pages == [1, 3] and answer.page_method == "--pages"
    assert answer.to_json()["page_choice"] == {"method": "--pages", "detail": "pages given with --pages; pages 1, 3 "
                                               f"read together in one prompt ({answer.tokens['visual']} visual tokens)"}
    assert "read together in one prompt" in answer.page_reason and str(answer.tokens["visual"]) in answer.page_reason
    prompt = [segment for prefill in backend.prompts for segment in prefill]
    texts = [s for s in prompt if isinstance(s, str)]
    images = [i for i, s in enumerate(prompt) if not isinstance(s, str)]
    assert len(images) == 2, "both pages' visual tokens go into the one prompt"
    assert prompt[images[0] - 1] == page_label(0, True) and prompt[images[1] - 1] == page_label(2, False)
    assert "Page 1:" in prompt[images[0] - 1] and "Page 3:" in prompt[images[1] - 1]
    assert texts[-1].strip().startswith(QUESTION) or QUESTION in texts[-1]
    visual_rows = sum(len(prompt[i]) for i in images)
    assert answer.tokens["visual"] == visual_rows == backend.stats.embedding_rows
    # Each page's tokens are exactly those it makes alone (the same encoder output, in page order).
    alone = [asker.ask(report, QUESTION, AskOptions(pages=p, sampling=SamplingParams(max_tokens=1))).tokens["visual"]
             for p in ("1", "3")]
    assert [len(prompt[i]) for i in images] == alone


def test_together_is_refused_with_the_numbers_when_the_model_was_not_trained_for_them(bundle, report):
    loaded = resolve_bundle(str(bundle))
    # The bundle's context is only where it starts: it grows up to the 4,096 the LLM was trained on.
    asker = Asker.load(dataclasses.replace(loaded, n_ctx=1500), device="cpu", dtype="float32")
    with pytest.raises(ContextOverflowError) as refused:
        asker.ask(report, QUESTION, OPTIONS)
    message = str(refused.value)
    assert "2 pages together need" in message and "the context holds at most 4096 tokens, what tiny-llama was trained on" in message
    assert refused.value.n_ctx == 4096 and refused.value.n_needed > 4096
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "ask", report, QUESTION, "--model", bundle, "--pages",
                                "1,3", "--together", "--json"], capture_output=True, text=True, timeout=300)
    # The model's trained context: a limit of the model (exit 4), as every context overflow.
    assert completed.returncode == ExitCode.MODEL
    failed = json.loads(completed.stdout)  # the one record, failed (issue 24: stdout is never empty with --json)
    assert failed["error"]["kind"] == "model" and failed["answer"] is None and failed["pages"] is None
    assert "2 pages together need" in completed.stderr and "(4896 visual + " in completed.stderr
    errors = [line for line in " ".join(completed.stderr.split()).split("fila: ")[1:] if line.startswith("error: ")]
    assert len(errors) == 1 and "at most 4096 tokens, what tiny-llama was trained on" in errors[0]
    assert "drop --together" in errors[0] and "Traceback" not in completed.stderr


def test_a_fixed_ctx_size_refuses_naming_the_option_and_how_far_it_may_go(bundle, report):
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "ask", report, QUESTION, "--model", bundle, "--pages",
                                "1", "--ctx-size", "1024", "--json"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == ExitCode.MODEL, completed.stderr
    said = " ".join(completed.stderr.split())
    assert "LLM context 1024 tokens (--ctx-size)" in said
    assert "the context holds 1024 tokens (--ctx-size); raise --ctx-size up to 4096, what the model was trained on," in said
    for bad in ("0", "100"):
        refused = subprocess.run([sys.executable, "-m", "fila_cli", "ask", report, QUESTION, "--model", bundle,
                                  "-c", bad], capture_output=True, text=True, timeout=120)
        assert refused.returncode == ExitCode.USAGE and "--ctx-size must be at least 256" in refused.stderr


@pytest.fixture(scope="module")
def invoice(tmp_path_factory):
    from fila_cli.documents.sample import write_sample_invoice

    return write_sample_invoice(tmp_path_factory.mktemp("invoice") / "invoice.pdf")


def test_two_a4_pages_together_fit_a_model_trained_for_them_without_options(bundle_8k, invoice):
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "ask", invoice, QUESTION, "--model", bundle_8k,
                                "--pages", "1,2", "--together", "--max-tokens", "3", "--json"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    answer = json.loads(completed.stdout)
    assert answer["pages"] == [1, 2] and answer["tokens"]["visual"] > 4096
    said = " ".join(completed.stderr.split())
    # What fila chose and why, on stderr: where the context starts, how far it may grow, and the growth.
    assert "LLM context 4096 tokens, grown as prompts need up to 8192: what tiny-llama was trained on" in said
    needed = answer["tokens"]["visual"] + answer["tokens"]["prompt"] + 1
    assert "LLM context grown from 4096 to " in said and f"tokens for a {needed}-token prompt (at most 8192" in said


def test_chat_adds_a_page_that_needs_a_larger_context(bundle_8k, invoice):
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "chat", invoice, "--model", bundle_8k,
                                "--max-tokens", "3"], input=f"/page +2\n{QUESTION}\n",
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    turns = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [t["pages"] for t in turns] == [[1, 2]] and turns[0]["tokens"]["visual"] > 4096
    assert "LLM context grown from 4096 to " in " ".join(completed.stderr.split())


def test_batch_together_reads_two_a4_pages_a_model_was_trained_for(bundle_8k, invoice, tmp_path):
    out = tmp_path / "out.jsonl"
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "batch", invoice, "-q", QUESTION, "--pages", "1,2",
                                "--together", "--model", bundle_8k, "--max-tokens", "3", "-o", out],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["error"] is None and record["pages"] == [1, 2] and record["tokens"]["visual"] > 4096


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    return folder


def ask_json(bundle, path, *args):
    return subprocess.run([sys.executable, "-m", "fila_cli", "ask", path, "What is the total due?", "--model", bundle,
                           "--max-tokens", "3", "--json", *args], capture_output=True, text=True, timeout=300)


def test_a_truncated_pdf_is_answered_with_a_warning(bundle, corpus):
    path = corpus / "truncated_tail.pdf"
    completed = ask_json(bundle, path)
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    expected = f"{path} was damaged and repaired; some content may be missing"
    assert record["warnings"] == [expected]
    assert f"fila: warning: {expected}" in completed.stderr.splitlines()
    assert record["page_choice"]["method"] in ("all pages, most confident", "text-layer BM25", "--pages", "the only page")


def test_a_pdf_with_nothing_readable_exits_3(bundle, corpus):
    completed = ask_json(bundle, corpus / "truncated_head.pdf")
    assert completed.returncode == ExitCode.DOCUMENT
    failed = json.loads(completed.stdout)
    assert failed["error"]["kind"] == "document" and failed["answer"] is None and failed["warnings"] is None
    assert completed.stderr.startswith("fila: error: ") and len(completed.stderr.strip().splitlines()) == 1


def test_batch_records_carry_warnings_and_page_choice(bundle, corpus, report, tmp_path):
    out = tmp_path / "out.jsonl"
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "batch", corpus / "truncated_tail.pdf",
                                corpus / "bit_flipped.pdf", report, "-q", "What are the prices in 2024?", "--model",
                                bundle, "--max-tokens", "3", "-o", out], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    records = {r["file"].rsplit("/", 1)[-1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["truncated_tail.pdf"]["warnings"] == [f"{corpus / 'truncated_tail.pdf'} was damaged and repaired; "
                                                         "some content may be missing"]
    flipped, = records["bit_flipped.pdf"]["warnings"]
    assert "could not be read entirely" in flipped and "zlib" in flipped
    assert records["report.pdf"]["warnings"] == []
    assert records["report.pdf"]["page_choice"]["method"] == "text-layer BM25" and records["report.pdf"]["pages"] == [3]
    assert sum(line.startswith("fila: warning: ") for line in completed.stderr.splitlines()) == 2


def test_page_choice_says_why(bundle, report, tmp_path):
    asker = Asker.load(resolve_bundle(str(bundle)), device="cpu", dtype="float32")
    short = SamplingParams(max_tokens=2)
    by_text = asker.ask(report, "What were the prices in 2024?", AskOptions(sampling=short)).to_json()["page_choice"]
    assert by_text["method"] == "text-layer BM25" and "page 3 matches" in by_text["detail"]
    scan = tmp_path / "scan.pdf"
    document = pymupdf.open()
    for _ in range(2):
        document.new_page().insert_image(pymupdf.Rect(0, 0, 200, 200), pixmap=pymupdf.Pixmap(pymupdf.csRGB, (0, 0, 64, 64), 0))
    document.save(scan)
    every = asker.ask(scan, "What is this?", AskOptions(sampling=short)).to_json()["page_choice"]
    assert every["method"] == "all pages, most confident" and "gave the most confident answer" in every["detail"]
    given = asker.ask(report, "What?", AskOptions(pages="2", sampling=short)).to_json()["page_choice"]
    assert given == {"method": "--pages", "detail": "pages given with --pages"}


def test_fila_sample_writes_a_three_page_invoice_with_a_scanned_page(tmp_path):
    from fila_cli.documents.sample import SAMPLE_TOTAL_DUE

    command = [sys.executable, "-m", "fila_cli", "sample", "invoice.pdf"]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert 'fila ask invoice.pdf "What is the total due?"' in " ".join(completed.stderr.split())
    with pymupdf.open(tmp_path / "invoice.pdf") as document:
        texts = [page.get_text() for page in document]
        assert len(texts) == 3 and "INVOICE" in texts[0] and f"Total due: {SAMPLE_TOTAL_DUE}" in texts[1]
        assert texts[2].strip() == "" and document[2].get_images(), "page 3 is a scan: pixels, no text layer"
        pixels = np.frombuffer(document[2].get_pixmap().samples, dtype=np.uint8)
        assert pixels.min() < 128, "the scanned page shows its text"
    first = (tmp_path / "invoice.pdf").read_bytes()
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == ExitCode.USAGE and "--force" in again.stderr
    forced = subprocess.run(command + ["--force"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0 and (tmp_path / "invoice.pdf").read_bytes() == first, "the sample is deterministic"


@pytest.mark.parametrize("name, says", [("truncated_tail.pdf", "was damaged and repaired"),
                                        ("bit_flipped.pdf", "could not be read entirely (MuPDF: ")])
def test_a_second_ask_answered_from_the_cache_warns_as_the_first(bundle, corpus, name, says):
    """MuPDF complains about a broken stream only when it renders the page: the page's notices are
    cached with its tokens, so the second ask (no render) warns exactly as the first."""
    path = corpus / name
    runs = [ask_json(bundle, path, "--pages", "1") for _ in range(2)]
    first, second = (json.loads(run.stdout) for run in runs)
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr
    assert second["timings"]["render_s"] == 0 and second["timings"]["encode_s"] == 0, "the second ask rendered the page"
    assert first["warnings"] == second["warnings"] and len(first["warnings"]) == 1
    assert first["warnings"][0].startswith(f"{path} {says}")
    for run in runs:
        assert [line for line in run.stderr.splitlines() if line.startswith("fila: warning: ")] == \
               [f"fila: warning: {first['warnings'][0]}"]
    # fila batch (pages rendered in its worker process) reads the same cached notices.
    batch = subprocess.run([sys.executable, "-m", "fila_cli", "batch", path, "-q", "What is the total due?", "--pages", "1",
                            "--model", bundle, "--max-tokens", "3"], capture_output=True, text=True, timeout=300)
    record = json.loads(batch.stdout)
    assert batch.returncode == 0 and record["warnings"] == first["warnings"] and record["timings"]["render_s"] == 0
    assert f"fila: warning: {first['warnings'][0]}" in batch.stderr.splitlines()


def small_pages_pdf(path, texts):
    """Pages of 400 x 200 points (a 672x336 canvas: 1,752 tiny visual tokens): two fit the bundle's context."""
    document = pymupdf.open()
    for text in texts:
        document.new_page(width=400, height=200).insert_text((20, 100), text, fontsize=14)
    document.save(path)
    return path


def test_batch_together_one_record_per_document_and_a_refusal_is_a_failed_record(bundle, report, tmp_path):
    small = small_pages_pdf(tmp_path / "small.pdf", ["Prices in 2023: 10 EUR", "Prices in 2024: 12 EUR"])
    out = tmp_path / "out.jsonl"
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "batch", small, report, "-q", QUESTION, "-q", "Why?",
                                "--pages", "1,2", "--together", "--model", bundle, "--max-tokens", "3", "-o", out],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.FAILURE, completed.stderr  # some records failed; the batch went on
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["file"].rsplit("/", 1)[-1], r["question"]) for r in records] == \
           [("small.pdf", QUESTION), ("small.pdf", "Why?"), ("report.pdf", QUESTION), ("report.pdf", "Why?")]
    for record in records[:2]:
        assert record["error"] is None and record["pages"] == [1, 2]
        assert "pages 1, 2 read together in one prompt" in record["page_choice"]["detail"]
        assert f"({record['tokens']['visual']} visual tokens)" in record["page_choice"]["detail"]
    # Alone, each small page makes half the visual tokens the two make together.
    alone = subprocess.run([sys.executable, "-m", "fila_cli", "ask", small, QUESTION, "--pages", "1", "--model", bundle,
                            "--max-tokens", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert records[0]["tokens"]["visual"] == 2 * json.loads(alone.stdout)["tokens"]["visual"]
    for record in records[2:]:  # two Letter pages: 4,896 visual tokens in a context of 4,096
        assert record["answer"] is None and record["error"]["kind"] == "model"
        assert "2 pages together need" in record["error"]["message"] and "(4896 visual + " in record["error"]["message"]
        assert "the context holds at most 4096 tokens, what tiny-llama was trained on" in record["error"]["message"]
    assert "2 answered; 2 failed; failures: model 2" in completed.stderr
