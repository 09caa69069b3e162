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
from typer.testing import CliRunner

from fila_cli.cli.app import app
from fila_cli.errors import ExitCode
from fila_cli.qa.batch import collect_documents
from fila_cli.qa.run import load_done
from tests.helpers.bad_documents import BOMB_SIDE, _bomb_deflate, _bomb_pdf, make_good_pdf
from tests.helpers.tiny_bundle import LLM_FILE, MMPROJ_FILE, build_tiny_bundle
from tests.helpers.tiny_vision import page_image

QUESTIONS = ["What is the total due?", "Who signed the letter?"]


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
    (folder / "aaa_broken.pdf").write_text("not a PDF")  # sorted first: a failed record before the kill
    out = tmp_path / "out.jsonl"
    command = batch_command(bundle, folder, "-q", QUESTIONS[0], "-q", QUESTIONS[1], "-o", out)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lines(out, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    with open(out, "a") as handle:  # a torn record, as a kill in the middle of a write leaves
        handle.write('{"file": "torn')
    before = read_records_but_the_torn_line(out)
    assert 3 <= len(before) < 18 and [r["error"]["kind"] for r in before[:2]] == ["document", "document"]
    answered_before = sum(r["error"] is None for r in before)
    completed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.FAILURE, completed.stderr  # the broken document fails again
    records = read_records(out)  # every line is a whole JSON record
    keys = Counter((r["file"], r["question"]) for r in records)
    assert len(keys) == 18 and set(keys.values()) == {1}, "each (document, question) exactly once"
    assert sum(r["error"] is not None for r in records) == 2
    assert records[:answered_before] == [r for r in before if r["error"] is None], "answered records kept as they were"
    assert f"{answered_before} already done" in completed.stderr


def read_records_but_the_torn_line(path):
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1]]


def test_resume_cuts_the_torn_line_and_drops_failed_records(tmp_path):
    good = {"file": "a.pdf", "question": "q", "model": "m", "sha256": "1" * 64, "answer": "x", "error": None}
    copy = {**good, "file": "copy.pdf"}  # another file with the same bytes: another unit of work
    failed = {**good, "file": "b.pdf", "sha256": "2" * 64, "answer": None, "error": {"kind": "timeout", "message": "m"}}
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in (good, failed, copy, good)) + '{"file": "c.pd')
    done = {("a.pdf", "1" * 64, "q", "m"), ("copy.pdf", "1" * 64, "q", "m")}
    assert load_done(out) == done
    assert read_records(out) == [good, copy], "failed, duplicate and torn records are removed; the good ones are kept"
    assert load_done(out) == done and read_records(out) == [good, copy]


ALLOCATE_UNDER_A_BUDGET = """
import sys
from fila_cli.qa.isolation import limit_memory
limit_memory(64 * 1024**2)
small = bytearray(16 * 1024**2)  # within the budget
try:
    bytearray(512 * 1024**2)
except MemoryError:
    sys.exit(0)
sys.exit(1)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
def test_the_worker_memory_budget_makes_a_big_allocation_fail():
    completed = subprocess.run([sys.executable, "-c", ALLOCATE_UNDER_A_BUDGET], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


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
    # Rendering a gigapixel image takes MuPDF far longer than 0.2 s: both slow documents time out,
    # and neither hangs the batch.
    slow = [tmp_path / f"slow{n}.pdf" for n in (1, 2)]
    bomb = _bomb_pdf(BOMB_SIDE, _bomb_deflate(BOMB_SIDE))
    for path in slow:
        path.write_bytes(bomb)
    completed = subprocess.run(batch_command(bundle, *slow, "-q", QUESTIONS[0],
                                             "--timeout", "0.2"), capture_output=True, text=True, timeout=300)
    assert completed.returncode == ExitCode.FAILURE
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [r["error"]["kind"] for r in records] == ["timeout", "timeout"]


def test_usage_errors(bundle, folder, tmp_path):
    out = tmp_path / "exists.jsonl"
    out.write_text('{"x": 1}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = CliRunner()
    for args in ([folder, "-q", "q", "-o", out],  # would overwrite records without --resume
                 [folder],  # no question
                 [folder, "-q", "q", "--resume"],  # --resume without --output
                 [empty, "-q", "q"],  # a folder without documents
                 [f"{folder}/*.nothing", "-q", "q"],  # a glob that matches nothing
                 [folder, "-q", "q", "--timeout", "0"],
                 [folder, "-q", "q", "--pipeline-depth", "-1"]):
        result = runner.invoke(app, batch_command(bundle, *args)[3:])
        assert result.exit_code == ExitCode.USAGE, (args, result.output)
    assert out.read_text() == '{"x": 1}\n'


def test_a_model_that_cannot_load_exits_4(bundle, folder, tmp_path):
    broken = tmp_path / "broken-bundle"
    broken.mkdir()
    for file in bundle.iterdir():
        data = file.read_bytes()
        (broken / file.name).write_bytes(data[: len(data) // 2] if file.name == LLM_FILE else data)
    result = CliRunner().invoke(app, batch_command(broken, folder / "letter.pdf", "-q", "q")[3:])
    assert result.exit_code == ExitCode.MODEL, result.output
    assert "Traceback" not in result.output and LLM_FILE in result.output


def test_paths_folders_and_quoted_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.pdf", "b.PNG", "notes.txt", "sub/c.pdf"):
        (tmp_path / name).write_bytes(b"x")
    names = lambda paths: sorted(p.relative_to(tmp_path).as_posix() for p in paths)  # noqa: E731
    assert names(collect_documents([str(tmp_path)], recursive=False)) == ["a.pdf", "b.PNG"]
    assert names(collect_documents([str(tmp_path)], recursive=True)) == ["a.pdf", "b.PNG", "sub/c.pdf"]
    assert names(collect_documents([f"{tmp_path}/*.pdf"], recursive=False)) == ["a.pdf"]
    assert names(collect_documents([f"{tmp_path}/**/*.pdf"], recursive=True)) == ["a.pdf", "sub/c.pdf"]
    # A file named twice (as itself and through its folder) is answered once.
    assert names(collect_documents([str(tmp_path / "a.pdf"), str(tmp_path)], recursive=False)) == ["a.pdf", "b.PNG"]


def test_resume_with_other_explicit_weights_answers_again(bundle, folder, tmp_path):
    other = build_tiny_bundle(tmp_path / "other", seed=1)
    out = tmp_path / "out.jsonl"

    def run(weights, *extra):
        command = [sys.executable, "-m", "fila_cli", "batch", folder / "letter.pdf", "-q", QUESTIONS[0], "-o", out,
                   "--llm", weights / LLM_FILE, "--mmproj", weights / MMPROJ_FILE, "--max-tokens", "4", *extra]
        completed = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600)
        assert completed.returncode == ExitCode.OK, completed.stderr

    run(bundle)
    run(other, "--resume")  # other weights: nothing of theirs is done yet
    run(other, "--resume")  # the same weights again: everything is
    records = read_records(out)
    names = [r["model"] for r in records]
    assert len(records) == 2 and len(set(names)) == 2, names
    assert all(name.startswith("custom:") for name in names)


def test_model_time_between_pages_does_not_count_against_the_timeout(bundle, tmp_path):
    # A 16-page scan: no text layer, so every page is rendered, encoded and answered in turn.
    # Enough pages that the model's time dwarfs the worker's on fast machines too (CI's tiny
    # model answered 6 pages in 0.56 s, too close to the timeout's floor).
    import pymupdf

    pages = 16
    scans = tmp_path / "scans.pdf"
    document = pymupdf.open()
    for seed in range(pages):
        png = tmp_path / f"scan{seed}.png"
        page_image(800, 600, seed=seed).save(png)
        document.new_page().insert_image(pymupdf.Rect(0, 0, 612, 792), filename=str(png))
    document.save(scans)

    def run(timeout_s):
        completed = subprocess.run(batch_command(bundle, scans, "-q", QUESTIONS[0], "--timeout", timeout_s),
                                   capture_output=True, text=True, timeout=600)
        return completed, [json.loads(line) for line in completed.stdout.splitlines()]

    _, [measured] = run(600)
    assert measured["error"] is None
    render_s = measured["timings"]["render_s"]
    model_s = sum(measured["timings"][k] for k in ("encode_s", "prefill_s", "generate_s"))
    # Below the model's time before the last page, far above all the renders together; the
    # floor leaves room for the worker's opening and inter-process round trips.
    timeout_s = max(5 * render_s, 0.3)
    assert timeout_s < model_s * (pages - 1) / pages, f"the premise failed: renders {render_s:.2f} s, model {model_s:.2f} s"
    completed, [record] = run(f"{timeout_s:.2f}")
    assert completed.returncode == ExitCode.OK, (record, completed.stderr)
    assert record["error"] is None and record["pages"][0] in range(1, pages + 1) and record["answer"] is not None
