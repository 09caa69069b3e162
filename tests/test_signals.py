"""Signals are the CLI's (cli/stopping.py), never the library's: SIGTERM is handled like Ctrl-C in
ask, chat, batch and eval (the record in flight finished or dropped whole, the summary printed,
exit 143), and a second signal stops at once with the output still whole. Real subprocesses, real
tiny models; each signal is sent once the process has installed its handler (read from /proc)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fila_cli.errors import ExitCode
from tests.helpers.bad_documents import make_good_pdf

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
DEADLINE_S = 300
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    for i in range(8):
        make_good_pdf(folder / f"doc{i:02d}.pdf", [f"Document number {i}, total due {i * 10} EUR"])
    return folder


def fila(bundle, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fila_cli", *map(str, args), "--model", str(bundle)],
                            stderr=subprocess.PIPE, text=True, **kwargs)


def catches(process, signum) -> bool:
    """Whether ``process`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    for line in open(f"/proc/{process.pid}/status").read().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def wait_until(condition, process, what):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"the command ended before {what}: {process.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError(f"no {what} in time")


def lines_of(path):
    text = path.read_text()
    assert text == "" or text.endswith("\n")  # whole lines only
    return [json.loads(line) for line in text.splitlines()]


def test_sigterm_stops_a_batch_after_the_record_in_flight_and_exits_143(bundle, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    process = fila(bundle, "batch", folder, "-q", "What is the total due?", "-o", out, "--max-tokens", 4)
    wait_until(lambda: out.exists() and out.read_text().count("\n") >= 1, process, "a first record")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.TERMINATED == 143, stderr
    assert "Traceback" not in stderr
    assert "fila batch: interrupted:" in stderr and "answered" in stderr  # the summary line
    records = lines_of(out)
    assert 1 <= len(records) < 8 and all(r["error"] is None for r in records)


def test_a_second_signal_stops_the_batch_at_once_with_the_output_whole(bundle, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    # Long answers: the record in flight takes a while, so the second signal lands inside one.
    process = fila(bundle, "batch", folder, "-q", "Describe the page in detail.", "-o", out, "--max-tokens", 2000,
                   "--temperature", 1.0)
    wait_until(lambda: out.exists() and out.read_text().count("\n") >= 1, process, "a first record")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGTERM)  # the second: at once (its exit code: the last signal's)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (ExitCode.INTERRUPTED, ExitCode.TERMINATED), stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "fila: error: interrupted"
    assert len(lines_of(out)) < 8  # every line a whole record; the batch did not run on


def test_sigterm_during_ask_exits_143_without_a_traceback(bundle, folder, tmp_path):
    process = fila(bundle, "ask", folder / "doc00.pdf", "Describe the page in detail.", "--json", "--max-tokens", 2000,
                   stdout=subprocess.PIPE)
    wait_until(lambda: catches(process, signal.SIGTERM), process, "a SIGTERM handler")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.TERMINATED, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "fila: error: interrupted"
    assert stdout == ""  # no record: the one in flight is dropped whole


def test_sigterm_ends_a_piped_chat_with_its_records_whole(bundle, folder, tmp_path):
    process = fila(bundle, "chat", folder / "doc00.pdf", "--max-tokens", 4, stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE)
    process.stdin.write("What is the total due?\n")
    process.stdin.flush()
    first = process.stdout.readline()  # one answer, then the chat waits for the next question
    assert json.loads(first)["error"] is None
    wait_until(lambda: catches(process, signal.SIGTERM), process, "a SIGTERM handler")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.TERMINATED, stderr
    assert "Traceback" not in stderr and stdout == ""


def test_sigterm_stops_eval_after_the_question_in_flight(bundle, tmp_path):
    from tests.helpers.lmms_data import image, png_bytes, write_parquet
    from tests.test_cli_eval import eval_args

    n = 6
    data = write_parquet(tmp_path / "validation-00000-of-00001.parquet", "docvqa", [
        {"questionId": str(i), "question": f"What is field {i}?", "answers": [str(i)], "image": image(png_bytes(90, 120, seed=i))}
        for i in range(n)])
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "fila_cli", *map(str, eval_args(bundle, data, out))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ})
    wait_until(lambda: out.exists() and out.read_text().count("\n") >= 1, process, "a first prediction")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.TERMINATED, stderr
    assert "fila eval: interrupted:" in stderr and "Traceback" not in stderr
    assert 1 <= len(lines_of(out)) < n


def test_sigterm_inside_exec_d_code_still_exits_143(tmp_path):
    """A signal landing while ``exec`` runs a string (dataclasses do, as modules import) must not turn
    ``python -m``'s exit into a SIGINT death: CPython marks a bare KeyboardInterrupt raised there as
    unhandled even once the CLI handled it. The CLI's own stop_signals and handle_errors, run with -m."""
    (tmp_path / "sigterm_in_exec.py").write_text(
        "import os, signal, time\n"
        "import typer\n"
        "from fila_cli.cli.stopping import stop_signals\n"
        "from fila_cli.cli.support import handle_errors\n"
        "def main():\n"
        "    with handle_errors(), stop_signals(immediate=True):\n"
        "        exec('os.kill(os.getpid(), signal.SIGTERM)\\ntime.sleep(30)', {'os': os, 'signal': signal, 'time': time})\n"
        "typer.run(main)\n")
    done = subprocess.run([sys.executable, "-m", "sigterm_in_exec"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
                          timeout=DEADLINE_S)
    assert done.returncode == ExitCode.TERMINATED, done.stderr
    assert done.stderr.strip() == "fila: error: interrupted"
