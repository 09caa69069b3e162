"""Issue 24: the papercuts a new user hits, each checked through the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fila_cli.cli.app import app
from fila_cli.errors import ExitCode
from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.tiny_bundle import build_tiny_bundle
from tests.helpers.tiny_vision import page_image


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


def test_dtype_float16_is_accepted(docs, bundle, tmp_path):
    out = tmp_path / "t.safetensors"
    result = invoke("encode", docs / "invoice.pdf", "--mmproj", next(bundle.glob("*mmproj*")), "--dtype", "float16",
                    "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.is_file()


# -- 2: encode and crops with a training run that has no LLM ------------------------------------


def test_encode_and_crops_take_a_training_run_without_an_llm(docs, tmp_path):
    from tests.helpers.tiny_vision import save_llava_next_checkpoint, tiny_llava_next

    base = save_llava_next_checkpoint(tiny_llava_next(seed=2), tmp_path / "base")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"stage": 1, "base": str(base), "out": str(run)}))
    out = tmp_path / "t.safetensors"
    encoded = invoke("encode", docs / "invoice.pdf", "--model", run, "--dtype", "float32", "-o", out)
    assert encoded.exit_code == 0, encoded.output
    assert out.is_file() and "fusion off" in encoded.output
    drawn = invoke("crops", docs / "invoice.pdf", "--model", run, "-o", tmp_path / "c.png")
    assert drawn.exit_code == 0, drawn.output


# -- 10: one spelling each ----------------------------------------------------------------------


def test_weights_path_takes_a_bundle_directory(bundle):
    result = invoke("weights", "path", bundle)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(bundle.resolve())


def test_train_takes_output_and_keeps_out(tmp_path):
    for flag in ("-o", "--output", "--out"):
        result = invoke("train", "--stage", "1", flag, tmp_path / "run")  # --data, --images, --base missing
        assert result.exit_code == ExitCode.USAGE and "missing --data, --images, --base" in result.output, result.output


@pytest.mark.parametrize("command", ["ask", "chat", "batch", "eval"])
def test_cache_is_spelled_the_same_on_every_command(command):
    import typer

    click_command = typer.main.get_command(app).commands[command]
    (cache,) = [p for p in click_command.params if p.name == "cache"]
    assert cache.opts == ["--cache"] and cache.secondary_opts == ["--no-cache"]
    assert cache.default is (command != "eval")  # eval keeps pages off the disk unless asked


def test_help_wording_for_commands_without_an_llm():
    for args in (["crops"], ["encode"], ["eval", "make-fragmentation"], ["eval", "score"]):
        text = " ".join(invoke(*args, "--help").output.split())
        assert "with --llm" not in text and "llama.cpp" not in text, (args, text)


def test_eval_score_prints_json_when_piped(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question_id": "1", "question": "Total?", "answers": ["5"], "image": "x.png"}) + "\n")
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"question_id": "1", "answer": "5"}) + "\n")
    completed = fila("eval", "score", "--task", "docvqa", "--data", data, "--predictions", predictions)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["task"] == "docvqa"  # stdout is not a terminal: JSON, no box-drawn table


# -- 11: --help for 80 columns and for a pipe ---------------------------------------------------


@pytest.mark.parametrize("command", [[], ["ask"], ["chat"], ["batch"], ["crops"], ["encode"], ["sample"], ["eval"],
                                     ["eval", "score"], ["train"], ["weights"], ["weights", "pull"], ["cache"], ["cache", "info"]])
def test_help_reads_well_at_80_columns(command):
    completed = fila(*command, "--help", env={**os.environ, "COLUMNS": "80"})
    assert completed.returncode == 0, completed.stderr
    text = completed.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    for bad in ("<bool>", "<list[str]>", "<str>", "{FILE}", "…", "\\[", "╭"):
        assert bad not in text, (command, bad)
    cut = [line for line in text.splitlines() if line.rstrip().endswith("...") and not line.startswith("Usage:")]
    assert not cut, cut  # no command summary cut short
    flags = [word for line in text.splitlines() for word in line.split() if word.startswith("--")]
    assert all(not flag.endswith(("-", "…")) for flag in flags), flags


def test_help_names_the_arguments_as_the_text_does():
    usage = invoke("ask", "--help").output.splitlines()[0]
    assert usage.endswith("ask [OPTIONS] FILE QUESTION")
    assert "-q, --question TEXT" in invoke("batch", "--help").output
    assert "fila-cli[ray]" in " ".join(invoke("batch", "--help").output.split())


# -- 13: stderr for scripts -----------------------------------------------------------------------


def test_stderr_lines_are_whole_and_not_followed_by_empty_ones_when_piped(docs, bundle):
    completed = fila("ask", docs / "scan.png", "What is this?", "--model", bundle, "--max-tokens", "2")
    assert completed.returncode == 0, completed.stderr
    lines = completed.stderr.splitlines()
    assert lines and "" not in lines, lines  # no empty line after the "bundle: ..." line
    note = [line for line in lines if line.startswith("prompt format:")]
    assert note and len(note[0]) > 80 and note[0].endswith(")"), lines  # one line, not wrapped at 80 columns
    # A one-page PNG: nothing was chosen among pages.
    assert json.loads(completed.stdout)["page_choice"]["method"] == "the only page"
