"""`fila ask` end to end: a tiny GGUF LLM and a tiny mmproj, built at test time, run by the real
llama.cpp over real PyMuPDF renders; and every documented exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import pymupdf
import pytest

from fila_cli.errors import ExitCode
from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.run_fila import fila, invoke
from tests.helpers.tiny_bundle import LLM_FILE, MMPROJ_FILE, build_tiny_bundle
from tests.helpers.tiny_vision import page_image

# The one record shape (fila_cli/qa/records.py): "error" is null in an answer's record.
DOCUMENTED_KEYS = {"file", "question", "answer", "pages", "confidence", "model", "timings", "tokens", "page_choice",
                   "warnings", "evidence", "evidence_reason", "error"}
TIMING_KEYS = {"render_s", "encode_s", "prefill_s", "generate_s"}
TOKEN_KEYS = {"visual", "prompt", "generated"}
QUESTION = "What is the total due?"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # Page 2 has a text layer naming the total; page 3 is a scan (an image, no text layer).
    path = tmp_path_factory.mktemp("docs") / "report.pdf"
    return make_good_pdf(path, ["Welcome to the annual report of the company",
                                "Invoice summary. The total due is 1,234.00 EUR, payable in 30 days.",
                                "Scanned appendix"], scanned_page=2) or path


def ask_json(bundle, *args, run=fila, **kwargs):
    """``fila ask ARGS --json`` with the bundle; run: ``fila`` (a process) or ``invoke`` (in this one)."""
    return run("ask", *args, "--model", bundle, "--max-tokens", 12, "--json", **kwargs)


def test_ask_pdf_end_to_end(bundle, report):
    first = ask_json(bundle, report, QUESTION)
    assert first.returncode == 0, first.stderr
    record = json.loads(first.stdout)  # stdout is exactly one JSON object
    assert set(record) == DOCUMENTED_KEYS
    assert set(record["timings"]) == TIMING_KEYS and set(record["tokens"]) == TOKEN_KEYS
    assert record["file"] == str(report) and record["question"] == QUESTION
    assert record["pages"] == [2], "the page chooser must pick the page whose text names the total"
    assert 0 < record["confidence"] <= 1
    assert record["tokens"]["visual"] > 576 and 0 < record["tokens"]["generated"] <= 12
    second = ask_json(bundle, report, QUESTION)
    assert json.loads(second.stdout)["answer"] == record["answer"], "greedy decoding must be deterministic"


def test_ask_png_and_question_from_stdin(bundle, tmp_path):
    image = tmp_path / "receipt.png"
    page_image(900, 400).save(image)
    completed = ask_json(bundle, image, "-", stdin=QUESTION + "\n")
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    assert record["question"] == QUESTION and record["pages"] == [1]


def test_piped_output_is_json_without_flag(bundle, report):
    completed = fila("ask", report, QUESTION, "--model", bundle, "--max-tokens", 4, "--pages", "1")
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["pages"] == [1]


def test_scanned_document_reads_every_page(bundle, tmp_path):
    scans = tmp_path / "scans.pdf"
    document = pymupdf.open()
    for seed in range(2):
        page = document.new_page()
        png = tmp_path / f"scan{seed}.png"
        page_image(800, 600, seed=seed).save(png)
        page.insert_image(page.rect, filename=str(png))
    document.save(scans)
    completed = ask_json(bundle, scans, QUESTION)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["pages"][0] in (1, 2)


def assert_one_failed_record(stdout: str, kind: str, question: str | None = None) -> dict:
    """``fila ask --json`` that fails prints exactly one record: the error, every answer key null."""
    (line,) = stdout.splitlines()
    record = json.loads(line)
    assert record["error"]["kind"] == kind and record["error"]["message"]
    assert record["answer"] is None and record["pages"] is None and record["confidence"] is None
    assert record["timings"] is None and record["tokens"] is None and record["page_choice"] is None
    assert record["warnings"] is None
    if question is not None:
        assert record["question"] == question
    return record


def assert_fails(completed, exit_code, *needles):
    assert completed.returncode == exit_code, (completed.returncode, completed.stderr)
    lines = completed.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("fila: error:"), completed.stderr
    assert "Traceback" not in completed.stderr
    # stdout holds exactly one record: the failed one, of the kind the exit code says
    record = assert_one_failed_record(completed.stdout, {ExitCode.DOCUMENT: "document", ExitCode.MODEL: "model",
                                                         ExitCode.USAGE: "usage"}[exit_code])
    assert record["error"]["message"] == lines[-1].removeprefix("fila: error: ")
    for needle in needles:
        assert needle in lines[-1]


def test_document_errors_exit_3(bundle, report, tmp_path):
    assert_fails(ask_json(bundle, tmp_path / "missing.pdf", QUESTION, run=invoke), ExitCode.DOCUMENT, "missing.pdf")
    not_pdf = tmp_path / "notes.pdf"
    not_pdf.write_text("just some text, not a PDF")
    assert_fails(ask_json(bundle, not_pdf, QUESTION, run=invoke), ExitCode.DOCUMENT, "notes.pdf")
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(report.read_bytes()[:300])
    assert_fails(ask_json(bundle, truncated, QUESTION, run=invoke), ExitCode.DOCUMENT, "truncated.pdf")
    assert_fails(ask_json(bundle, report, QUESTION, "--pages", "7", run=invoke), ExitCode.DOCUMENT, "report.pdf")


def test_encrypted_pdf(bundle, tmp_path):
    locked = tmp_path / "locked.pdf"
    document = pymupdf.open()
    document.new_page().insert_text((72, 72), "Total due: 99.00")
    document.save(locked, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="secret", owner_pw="owner")
    assert_fails(ask_json(bundle, locked, QUESTION, run=invoke), ExitCode.DOCUMENT, "locked.pdf", "--password")
    assert_fails(ask_json(bundle, locked, QUESTION, "--password", "wrong", run=invoke), ExitCode.DOCUMENT, "locked.pdf")
    completed = ask_json(bundle, locked, QUESTION, "--password", "secret")
    assert completed.returncode == 0, completed.stderr


def test_model_errors_exit_4(bundle, report, tmp_path):
    missing = invoke("ask", report, QUESTION, "--llm", tmp_path / "none.gguf", "--mmproj", bundle / MMPROJ_FILE, "--json")
    assert_fails(missing, ExitCode.MODEL, "none.gguf")
    mismatched = build_tiny_bundle(tmp_path / "mismatched", llm_width=64, mmproj_width=48)
    completed = invoke("ask", report, QUESTION, "--llm", mismatched / LLM_FILE, "--mmproj", mismatched / MMPROJ_FILE, "--json")
    assert_fails(completed, ExitCode.MODEL, "48", "64")


def test_not_installed_model_names_the_command(report, tmp_path):
    env_home = tmp_path / "hf"
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "ask", str(report), QUESTION, "--model", "llava-1.6-mistral-7b"],
                               capture_output=True, text=True, timeout=120,
                               env={**__import__("os").environ, "HF_HOME": str(env_home), "HF_HUB_OFFLINE": "1"})
    assert_fails(completed, ExitCode.MODEL, "fila weights pull llava-1.6-mistral-7b")


def test_usage_errors_exit_2(bundle, report):
    assert invoke("ask", report).returncode == ExitCode.USAGE  # no question
    assert_fails(ask_json(bundle, report, QUESTION, "--pages", "two", run=invoke), ExitCode.USAGE)
    assert_fails(ask_json(bundle, report, QUESTION, "--pages", "0", run=invoke), ExitCode.USAGE, "numbered from 1")  # issue 24
    assert_fails(ask_json(bundle, report, QUESTION, "--temperature", "-1", run=invoke), ExitCode.USAGE)


def test_a_page_past_the_models_trained_context_is_a_model_limit(tmp_path):
    from tests.helpers.tiny_bundle import write_tiny_mmproj
    from tests.helpers.tiny_llm import build_tiny_llm

    trained = 512
    llm = build_tiny_llm(tmp_path / "short-context.gguf", n_ctx_train=trained)
    mmproj = write_tiny_mmproj(tmp_path / MMPROJ_FILE)
    page = make_good_pdf(tmp_path / "letter.pdf", ["Dear customer, the total due is 310.00 EUR."])
    completed = fila("ask", page, QUESTION, "--llm", llm, "--mmproj", mmproj, "--max-tokens", 4, "--device", "cpu", "--json")
    assert_fails(completed, ExitCode.MODEL, "short-context.gguf", f"holds at most {trained}", "longer context")
    # The bundle's default context (4096) was capped at the model's training, and fila said so.
    assert f"trained on a {trained}-token context" in completed.stderr and "4096 asked" in completed.stderr
    refusal = completed.stderr.split("the prompt needs ")[1]
    needed = int(refusal.split()[0])
    visual = int(refusal.split("tokens (")[1].split()[0])
    assert visual > 2000 and needed > visual > trained  # a Letter page: ~2,300 visual tokens
    # The precision --dtype auto chose is on stderr (bfloat16 or float32 on a CPU, by its features).
    import torch

    from fila_cli.vision.devices import pick_dtype

    chosen = str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert f"vision encoder on cpu/{chosen}" in completed.stderr
