"""`fila batch`: bad documents never cost the good ones; kill -9 + --resume loses and duplicates
nothing; Ctrl-C leaves valid output and exits 130. Real llama.cpp, tiny bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from bad_documents import make_good_pdf
from fila_cli.errors import ExitCode
from tiny_bundle import build_tiny_bundle
from tiny_vision import page_image

QUESTIONS = ["What is the total due?", "Who signed the letter?"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inbox")
    make_good_pdf(folder / "invoice.pdf", ["Invoice 17", "The total due is 310.00 EUR"])
    make_good_pdf(folder / "letter.pdf", ["Dear customer, signed by Ada Lovelace"])
    page_image(500, 400).save(folder / "scan.png")
    (folder / "notes.pdf").write_text("a text file with a .pdf name")
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "cut.pdf").write_bytes((folder / "invoice.pdf").read_bytes()[:200])
    return folder


def batch_command(bundle, *args):
    return [sys.executable, "-m", "fila_cli", "batch", *map(str, args), "--model", str(bundle), "--max-tokens", "4"]


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bad_documents_are_recorded_and_good_ones_answered(bundle, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    completed = subprocess.run(batch_command(bundle, folder, "-q", QUESTIONS[0], "-q", QUESTIONS[1], "-o", out),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.FAILURE, completed.stderr
    assert completed.stdout == "" and "Traceback" not in completed.stderr
    assert "6 answered; 6 failed" in completed.stderr.strip().splitlines()[-1]
    records = read_records(out)
    assert len(records) == 6 * len(QUESTIONS)
    by_file = {}
    for record in records:
        by_file.setdefault(os.path.basename(record["file"]), []).append(record)
    for name in ("invoice.pdf", "letter.pdf", "scan.png"):
        for record in by_file[name]:
            assert record["error"] is None and record["answer"] is not None and record["pages"]
            assert len(record["sha256"]) == 64
    for name in ("notes.pdf", "empty.pdf", "cut.pdf"):
        for record in by_file[name]:
            assert record["error"]["kind"] == "document" and name in record["error"]["message"]
            assert record["answer"] is None


def test_stdout_holds_only_json_lines(bundle, folder):
    completed = subprocess.run(batch_command(bundle, folder / "letter.pdf", folder / "missing.pdf", "-q", QUESTIONS[1]),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == ExitCode.FAILURE
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [r["error"] is None for r in records] == [True, False]
    assert records[1]["error"]["kind"] == "document"


def wait_for_lines(path, n, process, deadline_s=300):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert process.poll() is None, "the batch ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("the batch wrote nothing in time")


def many_documents(tmp_path, n=8):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(n):
        make_good_pdf(folder / f"doc{i:02d}.pdf", [f"Document number {i}, total due {i * 10} EUR"])
    return folder


def test_kill_9_then_resume_loses_and_duplicates_nothing(bundle, tmp_path):
    folder = many_documents(tmp_path)
    out = tmp_path / "out.jsonl"
    command = batch_command(bundle, folder, "-q", QUESTIONS[0], "-q", QUESTIONS[1], "-o", out)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lines(out, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    with open(out, "a") as handle:  # a torn record, as a kill in the middle of a write leaves
        handle.write('{"file": "torn')
    first_pass = out.read_text().count("\n")
    assert first_pass < 16
    completed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.OK, completed.stderr
    records = read_records(out)  # every line is a whole JSON record
    keys = Counter((r["sha256"], r["question"]) for r in records)
    assert len(keys) == 16 and set(keys.values()) == {1}, "each (document, question) exactly once"
    assert f"{first_pass} already done" in completed.stderr


def test_ctrl_c_stops_after_the_record_in_flight(bundle, tmp_path):
    folder = many_documents(tmp_path)
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen(batch_command(bundle, folder, "-q", QUESTIONS[0], "-o", out),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_lines(out, 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.INTERRUPTED, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    records = read_records(out)
    assert 1 <= len(records) < 8 and all(r["error"] is None for r in records)


def test_a_document_past_the_timeout_is_recorded_and_the_batch_goes_on(bundle, folder, tmp_path):
    # 0.2 s is less than the worker needs to start: every document times out, none hangs the batch.
    completed = subprocess.run(batch_command(bundle, folder / "invoice.pdf", folder / "letter.pdf", "-q", QUESTIONS[0],
                                             "--timeout", "0.2"), capture_output=True, text=True, timeout=300)
    assert completed.returncode == ExitCode.FAILURE
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [r["error"]["kind"] for r in records] == ["timeout", "timeout"]


def test_usage_errors(bundle, folder, tmp_path):
    out = tmp_path / "exists.jsonl"
    out.write_text('{"x": 1}\n')
    assert subprocess.run(batch_command(bundle, folder, "-q", "q", "-o", out), capture_output=True, timeout=120).returncode == ExitCode.USAGE
    assert subprocess.run(batch_command(bundle, folder), capture_output=True, timeout=120).returncode == ExitCode.USAGE
