"""The library as a Python user meets it: ``fila_cli.load`` (the README's example, run as written),
a batch run from a worker thread with no signal handler touched, a stop request, chat recovering
from a stored state llama.cpp refuses, and the one record shape for failures. Real tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fila_cli.documents.document import open_document
from fila_cli.llm import LlamaBackend, LlamaSettings, SamplingParams, StateRefusedError
from fila_cli.qa.records import RECORD_KEYS
from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.tiny_bundle import LLM_FILE

# The README's library example, word for word (it names the sample invoice `fila sample` writes).
README_EXAMPLE = '''\
import fila_cli

with fila_cli.load() as model:  # $FILA_MODEL, else the default; or a bundle's name or folder
    answer = model.ask("invoice.pdf", "What is the total due?", pages=[1, 3])
    print(answer.answer, answer.pages, answer.confidence)
    print(answer.to_json())  # the JSON record, as `fila ask --json` prints it
'''


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    return [make_good_pdf(folder / f"doc{n}.pdf", [f"Invoice {n}", f"The total due is {n}00.00 EUR"])
            for n in range(1, 5)]


def test_the_readme_shows_this_example_word_for_word():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"```python\n{README_EXAMPLE}```" in readme


def test_the_readme_example_runs_as_written(bundle, tmp_path):
    from fila_cli.documents.sample import write_sample_invoice

    write_sample_invoice(tmp_path / "invoice.pdf")
    env = {**os.environ, "FILA_MODEL": str(bundle), "FILA_CACHE_DIR": str(tmp_path / "cache")}
    completed = subprocess.run([sys.executable, "-c", README_EXAMPLE], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    printed = completed.stdout.splitlines()
    record = eval(printed[-1], {})
    assert set(record) == set(RECORD_KEYS) and record["error"] is None
    assert record["pages"][0] in (1, 3) and record["file"] == "invoice.pdf"


def test_pages_are_integers_and_bad_ones_are_usage_errors(bundle):
    from fila_cli import AskOptions, UsageError

    assert AskOptions(pages=[1, 3]).pages == "1,3"
    for bad in ([0], [], [1.5], [True], "x"):
        with pytest.raises(UsageError):
            AskOptions(pages=bad)


def test_the_library_batch_runs_in_a_worker_thread_and_stops_when_asked(bundle, documents, tmp_path):
    import fila_cli

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    results, errors = {}, []
    stop = threading.Event()
    with fila_cli.load(str(bundle), device="cpu", dtype="float32", use_cache=False) as model:

        def run(name, should_stop):
            try:
                results[name] = model.batch(documents, ["What is the total due?"], tmp_path / f"{name}.jsonl",
                                            sampling=SamplingParams(max_tokens=4), should_stop=should_stop)
            except BaseException as error:  # the assertion below names it
                errors.append(error)

        worker = threading.Thread(target=run, args=("all", stop.is_set))
        worker.start()
        worker.join(timeout=600)
        assert not worker.is_alive() and errors == []
        # A stop already asked for: the batch writes nothing more and says it was interrupted.
        stop.set()
        stopped = threading.Thread(target=run, args=("stopped", stop.is_set))
        stopped.start()
        stopped.join(timeout=600)
    assert errors == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    summary = results["all"]
    assert summary.answered == len(documents) and summary.failed == 0 and not summary.interrupted
    records = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [Path(r["file"]).name for r in records] == [d.name for d in documents]
    assert all(set(RECORD_KEYS) <= set(r) and r["error"] is None for r in records)
    assert results["stopped"].interrupted and results["stopped"].answered == 0
    assert (tmp_path / "stopped.jsonl").read_text() == ""


def test_chat_recovers_from_a_stored_state_llama_cpp_refuses(bundle, documents, tmp_path, monkeypatch):
    """A page state on disk that passes the store's checks but that llama.cpp will not restore
    (saved by a context without flash attention): chat drops it and decodes the page again, as ask does."""
    from fila_cli import Asker, AskOptions, ModelOptions
    from fila_cli.qa.chat import ChatSession

    monkeypatch.setenv("FILA_CACHE_DIR", str(tmp_path / "cache"))
    options = AskOptions(pages="1", together=True, sampling=SamplingParams(max_tokens=4))
    model = ModelOptions(model=str(bundle), device="cpu", dtype="float32")
    asker = Asker.from_options(model)
    with open_document(documents[0]) as document:
        first = ChatSession(asker, document, options).ask("What is the total due?")
    (stored,) = list((tmp_path / "cache").rglob("*.llstate"))
    key = stored.name.removesuffix(".llstate")
    with LlamaBackend(bundle / LLM_FILE, n_ctx=asker.backend.n_ctx, settings=LlamaSettings(flash_attn=False)) as other:
        other.prefill([asker.prompts.prompt_start()])
        foreign = other.save_state()
    with pytest.raises(StateRefusedError):
        asker.backend.load_state(foreign)
    asker.prefix_store.put(key, foreign)
    again_asker = Asker.from_options(model)
    with open_document(documents[0]) as document:
        again = ChatSession(again_asker, document, options).ask("What is the total due?")
    assert again.answer == first.answer
    assert again_asker.prefix_store.get(key) is not None  # decoded again and stored again


def test_a_failed_chat_question_has_the_failed_batch_record_keys(bundle, documents, tmp_path):
    """Piped chat: a question too long for the context is a failed record with every key a failed
    batch record has (null), plus the chat's own; the answered ones carry the same keys."""
    huge = "total " * 20000
    env = {**os.environ, "FILA_CACHE_DIR": str(tmp_path / "cache")}
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "chat", str(documents[0]), "--model", str(bundle),
                                "--max-tokens", "4"], input=f"What is the total due?\n{huge}\n", env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1, completed.stderr
    answered, failed = (json.loads(line) for line in completed.stdout.splitlines())
    chat_keys = {"turn", "interrupted", "dropped_turns"}
    assert set(answered) == set(failed) == set(RECORD_KEYS) | chat_keys
    assert answered["error"] is None and failed["error"]["kind"] == "model"
    assert all(failed[key] is None for key in set(RECORD_KEYS) - {"file", "question", "model", "error"})
    batch = subprocess.run([sys.executable, "-m", "fila_cli", "batch", str(tmp_path / "missing.pdf"), "-q", "x",
                            "--model", str(bundle)], env=env, capture_output=True, text=True, timeout=300)
    (batch_failed,) = (json.loads(line) for line in batch.stdout.splitlines())
    assert set(batch_failed) - {"sha256"} == set(failed) - chat_keys
    assert {k for k, v in batch_failed.items() if v is None} - {"sha256"} == \
        {k for k, v in failed.items() if v is None} - chat_keys
