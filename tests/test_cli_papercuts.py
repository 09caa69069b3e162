"""Issue 24: the papercuts a new user hits, each checked through the CLI as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bad_documents import make_good_pdf
from tiny_bundle import build_tiny_bundle
from tiny_vision import page_image
from typer.testing import CliRunner

from fila_cli.cli.app import app
from fila_cli.errors import ExitCode


def fila(*args, input: str | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fila_cli", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=timeout, env=env)


def invoke(*args, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    make_good_pdf(folder / "invoice.pdf", ["Invoice 17", "The total due is 310.00 EUR"])
    make_good_pdf(folder / "letter.pdf", ["Dear customer, signed by Ada Lovelace"])
    page_image(500, 400).save(folder / "scan.png")
    return folder


# -- 5: one rule for an output path whose folder does not exist ---------------------------------


@pytest.mark.parametrize("command", [
    ["crops", "{pdf}", "-o", "{missing}/c.png"],
    ["encode", "{pdf}", "-o", "{missing}/t.safetensors", "--mmproj", "{mmproj}"],
    ["sample", "{missing}/x.pdf"],
    ["batch", "{pdf}", "-q", "What?", "-o", "{missing}/r.jsonl", "--model", "{bundle}"],
    ["eval", "--task", "docvqa", "--data", "{pdf}", "-o", "{missing}/p.jsonl", "--model", "{bundle}"],
    ["train", "--stage", "1", "--data", "{pdf}", "--images", "{missing}", "--base", "{missing}", "-o", "{missing}/run"],
])
def test_an_output_path_in_a_missing_folder_is_one_usage_line(command, docs, bundle, tmp_path):
    values = {"pdf": docs / "invoice.pdf", "missing": tmp_path / "nodir", "bundle": bundle, "mmproj": next(bundle.glob("*mmproj*"))}
    completed = fila(*[part.format(**values) for part in command])
    assert completed.returncode == ExitCode.USAGE, completed.stderr
    assert "the folder" in completed.stderr and "does not exist" in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr and "unexpected" not in completed.stderr
    assert not (tmp_path / "nodir").exists()  # fila creates no folder


# -- 6: a closed pipe ---------------------------------------------------------------------------


def test_a_closed_pipe_ends_the_batch_quietly(docs, bundle, tmp_path):
    # `fila batch ... | head -1`: head reads one record and closes the pipe.
    questions = tmp_path / "q.txt"
    questions.write_text("\n".join(f"Question {i}?" for i in range(6)))
    shell = (f"{sys.executable} -m fila_cli batch {docs} --questions {questions} --model {bundle} --max-tokens 2 "
             f"2>{tmp_path / 'err'}; echo $? > {tmp_path / 'rc'}")
    head = subprocess.run(["bash", "-c", f"({shell}) | head -1"], capture_output=True, text=True, timeout=600)
    assert len(head.stdout.splitlines()) == 1 and json.loads(head.stdout)["question"]
    stderr = (tmp_path / "err").read_text()
    assert "BrokenPipe" not in stderr and "please report" not in stderr and "Traceback" not in stderr, stderr
    assert int((tmp_path / "rc").read_text()) == ExitCode.BROKEN_PIPE


# -- 7: comments in a questions file ----------------------------------------------------------


def test_a_questions_file_skips_comments(docs, bundle, tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text("# invoices\nWhat is the total?\n\n  # a note\n")
    out = tmp_path / "r.jsonl"
    completed = fila("batch", docs / "invoice.pdf", "--questions", questions, "--model", bundle, "--max-tokens", "2", "-o", out)
    assert completed.returncode == 0, completed.stderr
    assert [json.loads(line)["question"] for line in out.read_text().splitlines()] == ["What is the total?"]
    assert "# are skipped" in " ".join(invoke("batch", "--help").output.split())


# -- 12: inputs caught early, with the right hint -----------------------------------------------


@pytest.mark.parametrize("command", ["ask", "batch"])
def test_page_zero_is_a_usage_error_before_the_model_loads(command, docs, tmp_path):
    question = ["What?"] if command == "ask" else ["-q", "What?"]
    completed = fila(command, docs / "invoice.pdf", *question, "--pages", "0", "--model", tmp_path / "no-such-bundle")
    assert completed.returncode == ExitCode.USAGE, completed.stderr
    assert "numbered from 1" in completed.stderr


def test_empty_questions_name_what_the_user_gave(docs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    given_q = fila("batch", docs / "invoice.pdf", "-q", "")
    assert given_q.returncode == ExitCode.USAGE and "-q: the question is empty" in given_q.stderr
    given_file = fila("batch", docs / "invoice.pdf", "--questions", empty)
    assert given_file.returncode == ExitCode.USAGE and f"{empty}: no question in it" in given_file.stderr
    from_stdin = fila("ask", docs / "invoice.pdf", "-", input="")
    assert from_stdin.returncode == ExitCode.USAGE and "read from stdin (-) is empty" in from_stdin.stderr


def test_sample_refuses_a_name_that_is_not_a_pdf(tmp_path):
    completed = fila("sample", tmp_path / "x.png")
    assert completed.returncode == ExitCode.USAGE and "name it *.pdf" in completed.stderr
    assert not (tmp_path / "x.png").exists()


# -- 3: crops --pages ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--pages", "--page", "-p"])
def test_crops_takes_pages_and_keeps_page(flag, docs, tmp_path):
    out = tmp_path / "c.png"
    result = invoke("crops", docs / "invoice.pdf", flag, "2", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "page 2" in result.output
