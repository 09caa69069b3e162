"""Evidence in every answer record (ask, batch, chat): where the answer is on the pages read, the
crop-boundary notice, ``fila ask --show-evidence``. Real PyMuPDF on the sample invoice, the real
document worker, a tiny random-weight bundle run by the real llama.cpp.

A random tiny model does not answer with the IBAN, so the notice *decision* is tested on real
located evidence of the sample's IBAN, and the CLI on whatever the tiny model answers: its
evidence must agree with the page (present when the answer is written there, each box's text the
page's), and the notice must appear exactly when a box straddles a crop boundary.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pymupdf
import pytest
from PIL import Image

import fila_cli
from fila_cli.cli.crops_view import CROP_LINE_COLOR, crop_boundaries_on_page
from fila_cli.config import AnyresConfig
from fila_cli.documents.canvas import plan_canvas
from fila_cli.documents.document import open_document
from fila_cli.documents.evidence import Evidence, crop_boundary_notice, locate_answer
from fila_cli.documents.page_words import tessdata_folder
from fila_cli.documents.sample import write_sample_invoice
from fila_cli.errors import UsageError
from fila_cli.qa.answer_evidence import (
    EVIDENCE_OCR_HINT,
    LOCATING_FAILED,
    boundary_notice,
    locate_on_document,
    locate_on_pages,
    record_notice,
)
from fila_cli.qa.isolation import DocumentWorker
from fila_cli.qa.records import RECORD_KEYS, Answer
from fila_cli.qa.timings import Timings
from fila_cli.vision.load import load_vision_weights
from tests.helpers.tiny_bundle import MMPROJ_FILE, build_tiny_bundle

IBAN = "GB29 NWBK 6016 1331 9268 19"
TOTAL = "2,510.40 GBP"
TOTALS_PAGE, SCANNED_PAGE = 2, 3  # 1-based pages of the sample
QUESTION = "What is the IBAN?"
NOTICE_START = "fila: note: the answer lies across a crop boundary on page"
EVIDENCE_KEYS = {"page", "bbox_pt", "bbox_px", "text", "match", "crops", "straddles_crop_boundary", "source"}
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_invoice(tmp_path_factory.mktemp("sample") / "invoice.pdf")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def tiny_anyres(bundle):
    weights = load_vision_weights(bundle / MMPROJ_FILE)
    return AnyresConfig(crop_size=weights.clip_config.image_size, image_grid_pinpoints=weights.image_grid_pinpoints)


def compact(text: str) -> str:
    return re.sub(r"\W+", "", text).lower()


def page_text(path, page: int) -> str:
    with pymupdf.open(path) as pdf:
        return pdf[page - 1].get_text()


def assert_evidence_agrees_with_the_page(record, path) -> None:
    """An answered record's evidence: a list whose boxes hold the page's own text; not empty when the
    answer is written on a page read; the reason null exactly when something was found."""
    evidence = record["evidence"]
    assert isinstance(evidence, list)
    assert (record["evidence_reason"] is None) == bool(evidence)
    for box in evidence:
        assert EVIDENCE_KEYS <= set(box) and box["page"] in record["pages"]
        assert compact(box["text"]) in compact(page_text(path, box["page"]))
    answer = compact(record["answer"])
    if answer and any(answer in compact(page_text(path, page)) for page in record["pages"]):
        assert evidence, f"{record['answer']!r} is on the page but was not located"


# -- the notice, decided on real located evidence --


def test_the_notice_says_the_iban_is_cut_only_with_fusion_off(sample):
    with open_document(sample) as document:
        iban = locate_on_document(document, [TOTALS_PAGE], IBAN, AnyresConfig())
        total = locate_on_document(document, [TOTALS_PAGE], TOTAL, AnyresConfig())
    assert iban.straddling_pages == [TOTALS_PAGE] and total.boxes and not total.straddles_crop_boundary
    notice = boundary_notice(iban, fusion=False)
    assert notice == crop_boundary_notice(iban, fusion=False) and f"page {TOTALS_PAGE}" in notice
    assert boundary_notice(iban, fusion=True) is None, "with fusion on the ConvNeXt branch reads the page uncut"
    assert boundary_notice(total, fusion=False) is None and boundary_notice(None, fusion=False) is None
    # The notice a batch prints comes from the written record, and names its file.
    record = Answer(str(sample), QUESTION, IBAN, [TOTALS_PAGE], 0.9, "m", Timings(), {}, evidence=iban).to_json()
    assert set(record) == set(RECORD_KEYS) and record["evidence"] == iban.to_json()["evidence"]
    assert record_notice(json.loads(json.dumps(record)), fusion=False) == f"{sample}: {notice}"
    assert record_notice(record, fusion=True) is None


def test_the_worker_reads_pages_that_locate_as_the_open_document_does(sample):
    """Batch locates on words and geometry the isolated worker read (sent as JSON): the same evidence
    as locating on the document opened here."""
    worker = DocumentWorker(timeout_s=60)
    try:
        worker.open(sample, QUESTION, f"{TOTALS_PAGE},{SCANNED_PAGE}", None)
        totals, scanned = worker.locatable_pages(sample, [TOTALS_PAGE - 1, SCANNED_PAGE - 1], AnyresConfig(), False)
    finally:
        worker.close()
    with open_document(sample) as document:
        for text in (IBAN, TOTAL, "17 May 2024", "no such words"):
            assert locate_on_pages([totals], text) == locate_answer(document, [TOTALS_PAGE - 1], text, AnyresConfig())
    assert locate_on_pages([totals], IBAN).straddling_pages == [TOTALS_PAGE]
    # A scanned page without OCR: no evidence, and the reason says how to get it.
    assert scanned.geometry is None
    no_ocr = locate_on_pages([scanned], IBAN)
    assert no_ocr.boxes == () and no_ocr.reason == f"no text layer; {EVIDENCE_OCR_HINT}"


def test_locating_never_costs_the_answer(sample):
    document = open_document(sample)
    document.close()  # reading its pages now fails: the evidence says so, nothing is raised
    failed = locate_on_document(document, [TOTALS_PAGE], IBAN, AnyresConfig())
    assert failed.boxes == () and failed.reason.startswith(LOCATING_FAILED)
    assert Evidence((), failed.reason).to_json() == {"evidence": [], "evidence_reason": failed.reason}


# -- the commands, on the tiny model's own answers --


def fila(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "fila_cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=TIMEOUT_S)


def test_ask_json_carries_evidence_the_notice_and_the_picture(bundle, sample, tiny_anyres, tmp_path):
    picture = tmp_path / "evidence.png"
    completed = fila("ask", sample, QUESTION, "--model", bundle, "--max-tokens", 8, "--json", "--pages", TOTALS_PAGE,
                     "--show-evidence", picture)
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    assert set(record) == set(RECORD_KEYS) and record["pages"] == [TOTALS_PAGE]
    assert_evidence_agrees_with_the_page(record, sample)
    straddles = any(box["straddles_crop_boundary"] for box in record["evidence"])
    assert (NOTICE_START in completed.stderr) == straddles, completed.stderr  # the tiny bundle has no fusion
    # The picture: the page as the model receives it, with its crop boundaries drawn...
    image = np.asarray(Image.open(picture).convert("RGB"))
    geometry = plan_canvas(image.shape[:2], tiny_anyres)
    xs, ys = crop_boundaries_on_page(geometry)
    assert xs and ys
    for x in xs:
        column = image[image.shape[0] // 2:, round(x)]  # below the label
        assert (np.abs(column.astype(int) - CROP_LINE_COLOR).max(axis=1) <= 10).mean() > 0.9
    # ... and exactly what `fila crops --find` draws for that answer on that page (the same drawing).
    reference = tmp_path / "crops.png"
    find = ["--find", record["answer"]] if record["answer"].strip() else []
    crops = fila("crops", sample, "--model", bundle, "--page", TOTALS_PAGE, *find, "-o", reference)
    assert crops.returncode == 0, crops.stderr
    assert np.array_equal(image, np.asarray(Image.open(reference).convert("RGB")))


def test_a_failed_ask_record_has_null_evidence(bundle, sample, tmp_path):
    completed = fila("ask", tmp_path / "missing.pdf", QUESTION, "--model", bundle, "--json")
    assert completed.returncode != 0
    record = json.loads(completed.stdout)
    assert set(record) == set(RECORD_KEYS) and record["evidence"] is None and record["evidence_reason"] is None


def test_show_evidence_must_be_a_png(bundle, sample, tmp_path):
    completed = fila("ask", sample, QUESTION, "--model", bundle, "--show-evidence", tmp_path / "out.jpg")
    assert completed.returncode == 2 and "PNG" in completed.stderr


def test_batch_and_chat_records_carry_evidence(bundle, sample, tmp_path):
    output, scanned_output, ocr_output = tmp_path / "batch.jsonl", tmp_path / "scanned.jsonl", tmp_path / "ocr.jsonl"
    with fila_cli.load(str(bundle)) as model:
        model.batch([sample, tmp_path / "missing.pdf"], [QUESTION, "What is the total?"], output, pages=[TOTALS_PAGE])
        model.batch([sample], [QUESTION], scanned_output, pages=[SCANNED_PAGE])
        model.batch([sample], [QUESTION], ocr_output, pages=[SCANNED_PAGE], evidence_ocr=True)
        with model.chat(sample, pages=[TOTALS_PAGE]) as session:
            chat_records = [session.record(session.ask(question)) for question in (QUESTION, "And the total?")]
            failed_chat = session.failed_record("x", UsageError("no"))
    records = [json.loads(line) for line in output.read_text().splitlines()]
    answered = [r for r in records if r["error"] is None]
    failed = [r for r in records if r["error"] is not None]
    assert len(answered) == 2 and len(failed) == 2
    for record in answered + chat_records:
        assert_evidence_agrees_with_the_page(record, sample)
        with open_document(sample) as document:  # located on the page read, with the model's canvases
            again = locate_answer(document, [TOTALS_PAGE - 1], record["answer"], model.asker.encoder.anyres)
        assert record["evidence"] == again.to_json()["evidence"]
    assert all(r["evidence"] is None and r["evidence_reason"] is None for r in [*failed, failed_chat])
    (scanned,) = (json.loads(line) for line in scanned_output.read_text().splitlines())
    assert scanned["evidence"] == [] and scanned["evidence_reason"] == f"no text layer; {EVIDENCE_OCR_HINT}"
    (ocr,) = (json.loads(line) for line in ocr_output.read_text().splitlines())
    if tessdata_folder() is None:
        assert ocr["evidence"] == [] and ocr["evidence_reason"].startswith("no text layer; install Tesseract")
    else:  # OCR read the scan: the answer was searched in its words
        assert ocr["evidence_reason"] in (None, "not found"), ocr["evidence_reason"]
        assert all(box["source"] == "ocr" for box in ocr["evidence"])


def test_batch_says_the_notice_exactly_for_straddling_records(bundle, sample, tmp_path):
    output = tmp_path / "batch.jsonl"
    completed = fila("batch", sample, "-q", QUESTION, "-q", "What is the total?", "--model", bundle, "--max-tokens", 8,
                     "--pages", TOTALS_PAGE, "-o", output)
    assert completed.returncode == 0, completed.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    straddling = sum(any(box["straddles_crop_boundary"] for box in r["evidence"]) for r in records)
    assert completed.stderr.count(f"fila: note: {sample}: the answer lies across a crop boundary") == straddling
