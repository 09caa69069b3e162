"""`fila eval` end to end: a tiny parquet in lmms-eval's schema, a tiny bundle (real llama.cpp), the
predictions file resumed exactly, and `fila eval score` re-scoring without a model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from fila_cli.errors import ExitCode
from fila_cli.eval.run import RecentPages
from tests.helpers.lmms_data import image, png_bytes, write_parquet
from tests.helpers.run_fila import fila, invoke


@pytest.fixture(scope="module")
def docvqa(tmp_path_factory):
    folder = tmp_path_factory.mktemp("DocVQA")
    rows = [
        {"questionId": "101", "question": "What is the total due?", "answers": ["310.00", "310"], "image": image(png_bytes(seed=1))},
        {"questionId": "102", "question": "Who signed the letter?", "answers": ["Ada Lovelace"], "image": image(png_bytes(seed=2))},
        {"questionId": "103", "question": "", "answers": ["x"], "image": image(png_bytes())},  # bad: empty question
        {"questionId": "104", "question": "What is the date?", "answers": ["1 May"], "image": None},  # bad: no image
        {"questionId": "105", "question": "Which page?", "answers": ["2"], "image": image(b"\x89PNG not really")},  # fails
    ]
    write_parquet(folder / "validation-00000-of-00002.parquet", "docvqa", rows[:3])
    write_parquet(folder / "validation-00001-of-00002.parquet", "docvqa", rows[3:] + [
        {"questionId": "106", "question": "What is the invoice number?", "answers": ["INV-7"], "image": image(png_bytes(seed=3))}])
    return folder


def eval_args(bundle, data, out, *extra):
    return ["eval", "--task", "docvqa", "--data", data, "--model", bundle, "-o", out, "--max-tokens", "3", "--json", *extra]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_end_to_end_then_resume_exactly_then_rescore(bundle, docvqa, tmp_path):
    out = tmp_path / "predictions.jsonl"
    first = fila(*eval_args(bundle, docvqa, out))
    assert first.returncode == ExitCode.FAILURE, first.stderr  # the corrupt image failed; the rest answered
    assert "Traceback" not in first.stderr
    scores = json.loads(first.stdout)  # stdout is exactly one JSON object
    assert scores["task"] == "docvqa" and scores["metric"] == "anls" and scores["model"] == bundle.name
    assert (scores["questions"], scores["answered"], scores["failed"], scores["missing"]) == (4, 3, 1, 0)
    assert scores["bad_rows"] == {"empty question": 1, "missing image": 1}
    written = records(out)
    assert [r["question_id"] for r in written] == ["101", "102", "105", "106"]
    failed = next(r for r in written if r["question_id"] == "105")
    assert failed["answer"] is None and failed["error"]["kind"] == "document" and "question 105" in failed["error"]["message"]
    answered = [r for r in written if r["error"] is None]
    assert all(isinstance(r["answer"], str) and 0.0 <= r["score"] <= 1.0 for r in answered)
    assert scores["score"] == pytest.approx(sum(r["score"] for r in answered) / 4, abs=1e-6)
    assert not list((tmp_path / "fila-cache").rglob("*.safetensors"))  # no disk cache unless --cache

    # A kill after the first record, in the middle of writing the second: the torn line is cut, the
    # missing questions are answered again (greedy: the same answers), the failed one is retried,
    # and no question gets two records.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    resumed = fila(*eval_args(bundle, docvqa, out, "--resume"))
    assert resumed.returncode == ExitCode.FAILURE, resumed.stderr
    assert "1 already done (--resume)" in resumed.stderr
    again = records(out)
    assert sorted(r["question_id"] for r in again) == ["101", "102", "105", "106"]
    by_id = {r["question_id"]: r["answer"] for r in again}
    assert by_id == {r["question_id"]: r["answer"] for r in written}
    assert json.loads(resumed.stdout) == scores

    # Re-scored from the file alone, without a model: the same numbers.
    rescored = fila("eval", "score", "--task", "docvqa", "--data", docvqa, "--predictions", out, "--json", timeout=120)
    assert rescored.returncode == ExitCode.OK, rescored.stderr
    assert {k: v for k, v in json.loads(rescored.stdout).items() if k != "model"} == {k: v for k, v in scores.items() if k != "model"}


def test_recent_pages_keeps_the_last_few():
    from fila_cli.documents.notices import ReadNotices
    from fila_cli.vision.token_cache import CachedPage

    pages = RecentPages(capacity=2)
    pages.put("a", CachedPage(1, ReadNotices()))
    pages.put("b", CachedPage(2, ReadNotices()))
    assert pages.get("a").page == 1  # "a" is now the most recent
    pages.put("c", CachedPage(3, ReadNotices()))
    assert [None if cached is None else cached.page for cached in (pages.get("a"), pages.get("b"), pages.get("c"))] == [1, None, 3]
    pages.discard("c")
    assert pages.get("c") is None


def test_existing_output_needs_resume(bundle, docvqa, tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text('{"question_id": "101"}\n')
    completed = invoke(*eval_args(bundle, docvqa, out))
    assert completed.returncode == ExitCode.USAGE and "--resume" in completed.stderr and completed.stdout == ""


def test_score_another_tools_predictions(docvqa, tmp_path):
    predictions = tmp_path / "theirs.jsonl"
    predictions.write_text("\n".join(json.dumps(p) for p in [
        {"question_id": 101, "answer": "310"},            # exact match with the second gold: 1
        {"question_id": "102", "answer": "Ada Lovelac"},  # one deletion in 12: 11/12
        {"question_id": "106", "answer": "no idea"},     # far: 0
    ]) + "\n")
    completed = fila("eval", "score", "--task", "docvqa", "--data", docvqa, "--predictions", predictions, "--json", timeout=120)
    assert completed.returncode == ExitCode.OK, completed.stderr
    scores = json.loads(completed.stdout)
    # four readable questions; 105 has no prediction and scores 0
    assert scores["score"] == pytest.approx((1 + 11 / 12 + 0 + 0) / 4, abs=1e-6)
    assert (scores["answered"], scores["missing"]) == (3, 1)
    # Piped without --json: the same JSON, as ask and batch do (issue 24); the table is for a terminal.
    piped = fila("eval", "score", "--task", "docvqa", "--data", docvqa, "--predictions", predictions, timeout=120)
    assert json.loads(piped.stdout) == scores


def test_score_usage_errors(docvqa, tmp_path):
    completed = invoke("eval", "score", "--task", "docvqa", "--data", docvqa, "--predictions", tmp_path / "none.jsonl")
    assert completed.returncode == ExitCode.USAGE and "none.jsonl: no such predictions file" in completed.stderr
    completed = invoke("eval", "score", "--task", "nope", "--data", docvqa, "--predictions", tmp_path / "none.jsonl")
    assert completed.returncode == ExitCode.USAGE and "unknown task" in completed.stderr


def wait_for_lines(path, n, process, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines")


def test_ctrl_c_then_kill_9_then_resume_gives_one_record_per_question(bundle, tmp_path):
    # (that resumed answers equal an uninterrupted run's is checked above; this is about the signals)
    n = 6
    data = write_parquet(tmp_path / "validation-00000-of-00001.parquet", "docvqa", [
        {"questionId": str(i), "question": f"What is field {i}?", "answers": [str(i)], "image": image(png_bytes(90, 120, seed=i))}
        for i in range(n)])
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "fila_cli", *map(str, eval_args(bundle, data, out))]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_lines(out, 1, process)
    process.send_signal(signal.SIGINT)  # stops after the question in flight
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.INTERRUPTED, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    interrupted = records(out)  # every line a whole record
    assert 1 <= len(interrupted) < n

    process = subprocess.Popen(command + ["--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_lines(out, len(interrupted) + 1, process)
    process.kill()  # kill -9: at most the record in flight is lost or torn
    process.communicate(timeout=60)

    finished = fila(*eval_args(bundle, data, out, "--resume"))
    assert finished.returncode == ExitCode.OK, finished.stderr
    final = records(out)
    assert sorted(r["question_id"] for r in final) == [str(i) for i in range(n)]  # one record per question
    assert all(r["error"] is None and isinstance(r["answer"], str) for r in final)


def test_scoring_loads_no_model_code(docvqa, tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"question_id": "101", "answer": "310"}\n')
    code = ("import sys\nfrom fila_cli.cli.app import app\n"
            f"try:\n    app(['eval', 'score', '--task', 'docvqa', '--data', {str(docvqa)!r}, '--predictions', {str(predictions)!r}, '--json'])\n"
            "except SystemExit:\n    pass\n"
            "print(' '.join(sys.modules), file=sys.stderr)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(completed.stdout)["answered"] == 1
    assert not {"torch", "llama_cpp", "timm", "transformers"} & set(completed.stderr.split())


def test_eval_help_loads_no_model_code():
    code = ("import contextlib, io, sys\nfrom fila_cli.cli.app import app\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    app(['eval', '--help'])\n"
            "print(' '.join(sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert not {"torch", "llama_cpp", "timm", "transformers"} & set(completed.stdout.split())


def test_resume_counts_a_prediction_holding_a_line_separator_as_done(bundle, docvqa, tmp_path):
    out = tmp_path / "predictions.jsonl"
    first = fila(*eval_args(bundle, docvqa, out))
    assert first.returncode == ExitCode.FAILURE, first.stderr  # the corrupt image fails
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    for record in written:  # an answer holding U+2028 raw, as fila writes it (legal JSON)
        if record["question_id"] == "101":
            record["answer"] = "310\u2028.00"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in written), encoding="utf-8")
    resumed = fila(*eval_args(bundle, docvqa, out, "--resume"))
    assert "3 already done (--resume)" in resumed.stderr, resumed.stderr
    again = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert sorted(r["question_id"] for r in again) == ["101", "102", "105", "106"], "no question answered twice"
    assert next(r for r in again if r["question_id"] == "101")["answer"] == "310\u2028.00"
