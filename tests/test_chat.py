"""`fila chat` through a real pseudo-terminal (pexpect), piped, and as a library: the page is decoded
once, follow-ups decode only their own text (counted by the backend), Ctrl-C stops an answer and
keeps the session, Ctrl-D exits 0, and a full context drops the oldest turns, never the page."""

from __future__ import annotations

import json
import sys

import pexpect
import pytest

from fila_cli.bundles.bundle import resolve_bundle
from fila_cli.documents.document import open_document
from fila_cli.llm import SamplingParams
from fila_cli.llm.templates import FAMILIES
from fila_cli.qa.ask import Asker, AskOptions
from fila_cli.qa.chat import ChatSession
from tests.helpers.bad_documents import make_good_pdf

PROMPT = "you> "
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return make_good_pdf(tmp_path_factory.mktemp("docs") / "report.pdf",
                         ["Welcome to the annual report", "The total due is 1,234.00 EUR", "Signed by Ada"])


def spawn_chat(bundle, report, *args, cwd):
    child = pexpect.spawn(sys.executable, ["-m", "fila_cli", "chat", str(report), "--model", str(bundle), *map(str, args)],
                          cwd=str(cwd), encoding="utf-8", timeout=TIMEOUT_S, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def ask(child, question):
    child.sendline(question)
    child.expect(r"new prompt tokens")  # the footer under each answer
    child.expect_exact(PROMPT)


def test_two_questions_then_page_2_through_a_terminal(bundle, report, tmp_path):
    child = spawn_chat(bundle, report, "--max-tokens", 6, cwd=tmp_path)
    ask(child, "What is the total due?")
    ask(child, "Who signed it?")
    child.sendline("/page 2")
    child.expect(r"page 2: \d+ visual tokens")
    child.expect_exact(PROMPT)
    ask(child, "What is on this page?")
    child.sendline("/save talk.json")
    child.expect("3 turns")
    child.expect_exact(PROMPT)
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    transcript = json.loads((tmp_path / "talk.json").read_text())
    first, second, third = transcript["turns"]
    # The page was decoded when the chat started: no turn decodes visual tokens again...
    assert [t["tokens"]["visual_decoded"] for t in transcript["turns"]] == [0, 0, 0]
    # ... and the follow-up decodes exactly its own text: the template's end of the last answer,
    # the question, the start of the next answer (counted by the backend).
    follow_up = FAMILIES["vicuna"].render_follow_up("Who signed it?", "</s>")
    from fila_cli.llm import LlamaBackend
    with LlamaBackend(resolve_bundle(str(bundle)).llm, n_ctx=512) as backend:
        assert second["tokens"]["prompt"] == len(backend.tokenize(follow_up))
    assert first["pages"] == [1] and second["pages"] == [1] and third["pages"] == [2]
    assert all(not t["interrupted"] for t in transcript["turns"])


def test_ctrl_c_stops_the_answer_and_keeps_the_session(bundle, report, tmp_path):
    child = spawn_chat(bundle, report, "--max-tokens", 3000, cwd=tmp_path)
    child.sendline("Describe the page in detail.")
    child.expect_exact("fila> ")
    child.expect(r"\S")  # the answer is streaming
    child.sendintr()  # Ctrl-C
    child.expect("stopped")
    child.expect_exact(PROMPT)
    child.sendline("/save talk.json")
    child.expect(r"talk.json: 1 turn\r?\n")  # not "1 turns"
    child.expect_exact(PROMPT)
    child.sendcontrol("c")  # Ctrl-C at the prompt: a fresh line, still running
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    turn, = json.loads((tmp_path / "talk.json").read_text())["turns"]
    assert turn["interrupted"] and 0 < turn["tokens"]["generated"] < 3000


def test_quit_commands_and_help_on_a_terminal(bundle, report, tmp_path):
    child = spawn_chat(bundle, report, "--max-tokens", 4, cwd=tmp_path)
    child.sendline("/help")
    child.expect("Ctrl-D")
    child.expect_exact(PROMPT)
    child.sendline("exit")  # typed alone: leaves, is not asked to the model
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "new prompt tokens" not in child.before


def test_piped_chat_exits_1_when_a_command_failed_and_stops_at_quit(bundle, report, tmp_path):
    import subprocess

    lines = ["What is the total due?", "/page 9", f"/save {tmp_path / 'nodir' / 't.json'}", "/quit", "Never asked?"]
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "chat", report, "--model", bundle, "--max-tokens", "4"],
                               input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 1, completed.stderr
    assert [json.loads(line)["question"] for line in completed.stdout.splitlines()] == ["What is the total due?"]
    assert "the folder" in completed.stderr and "does not exist" in completed.stderr


def test_piped_questions_give_one_json_line_each(bundle, report, tmp_path):
    import subprocess

    questions = ["What is the total due?", "Who signed?", "/page 3", "What is on page 3?"]
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "chat", report, "--model", bundle, "--max-tokens", "4"],
                               input="\n".join(questions) + "\n", capture_output=True, text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [r["question"] for r in records] == [q for q in questions if not q.startswith("/")]
    assert [r["turn"] for r in records] == [1, 2, 3] and [r["pages"] for r in records] == [[1], [1], [3]]
    assert records[2]["page_choice"]["method"] == "/page" and records[0]["warnings"] == []
    # Evidence on the pages in context: a list, and a reason exactly when it is empty.
    assert all(isinstance(r["evidence"], list) and (r["evidence_reason"] is None) == bool(r["evidence"]) for r in records)


def test_a_full_context_drops_the_oldest_turns_never_the_page(bundle, report):
    loaded = resolve_bundle(str(bundle))
    with open_document(report) as document:
        probe = Asker.load(loaded, device="cpu", dtype="float32")
        page_tokens = ChatSession(probe, document, AskOptions(sampling=SamplingParams(max_tokens=8))).context_used
        probe.backend.close()
        asker = Asker.load(loaded, device="cpu", dtype="float32", ctx_size=page_tokens + 70)  # fixed: never grown
        notices = []
        session = ChatSession(asker, document, AskOptions(sampling=SamplingParams(max_tokens=8)), on_notice=notices.append)
        turns = [session.ask(f"Question number {n}?") for n in range(6)]
        assert session.context_used <= asker.backend.n_ctx
        assert sum(t.dropped_turns for t in turns) > 0 and any("dropped the oldest" in n for n in notices)
        assert all(t.tokens["visual_decoded"] == 0 for t in turns), "the page was decoded again"
        assert session.pages[0].index == 0 and session.turns_in_context < len(turns)
        # What the context holds after dropping is exactly the page then the kept turns, decoded afresh.
        kept = session._context
        fresh = Asker(asker.encoder, asker.backend, asker.template, asker.bundle)
        assert len(kept) >= 1
        rebuilt = ChatSession(fresh, document, AskOptions(sampling=SamplingParams(max_tokens=8)))
        rebuilt._restore(kept)
        assert rebuilt.context_used == session.context_used


def test_text_layer_puts_the_page_text_where_ask_does_once(bundle, report):
    """`fila chat --text-layer`: the first turn's prompt is `fila ask --text-layer`'s (same answer,
    same confidence), the page's text is decoded once, not again with the follow-up."""
    import subprocess

    from fila_cli.llm import LlamaBackend

    question, follow_up = "What is the total due?", "Who signed it?"
    chat = subprocess.run([sys.executable, "-m", "fila_cli", "chat", report, "--model", bundle, "--pages", "2",
                           "--text-layer", "--max-tokens", "6"], input=f"{question}\n{follow_up}\n",
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert chat.returncode == 0, chat.stderr
    first, second = (json.loads(line) for line in chat.stdout.splitlines())
    asked = subprocess.run([sys.executable, "-m", "fila_cli", "ask", report, question, "--model", bundle, "--pages", "2",
                            "--text-layer", "--max-tokens", "6", "--json"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert first["answer"] == answer["answer"] and first["confidence"] == pytest.approx(answer["confidence"], abs=1e-5)
    with open_document(report) as document:
        page_text = " ".join(document.page_text(1).split())
    assert "1,234.00 EUR" in page_text
    template = FAMILIES["vicuna"]
    with LlamaBackend(resolve_bundle(str(bundle)).llm, n_ctx=512) as backend:
        with_text = template.render(f"Text of the page: {page_text}\n\n{question}")[1]
        assert first["tokens"]["prompt"] == len(backend.tokenize(with_text)), "the first turn did not read the text layer"
        assert second["tokens"]["prompt"] == len(backend.tokenize(template.render_follow_up(follow_up, "</s>"))), \
            "the follow-up decoded the text layer again"
    plain = subprocess.run([sys.executable, "-m", "fila_cli", "chat", report, "--model", bundle, "--pages", "2",
                            "--max-tokens", "6"], input=f"{question}\n", capture_output=True, text=True, timeout=TIMEOUT_S)
    with LlamaBackend(resolve_bundle(str(bundle)).llm, n_ctx=512) as backend:
        assert json.loads(plain.stdout)["tokens"]["prompt"] == len(backend.tokenize(template.render(question)[1]))


def test_a_stopped_answer_reports_its_real_generate_time(bundle, report):
    # Issue 24: an answer stopped after 914 tokens reported "generate 0.0s" (and /save kept it so).
    pieces: list[str] = []
    with open_document(report) as document:
        asker = Asker.load(resolve_bundle(str(bundle)), device="cpu", dtype="float32")
        session = ChatSession(asker, document, AskOptions(sampling=SamplingParams(max_tokens=400)))
        turn = session.ask("Describe the page in detail.", on_text=pieces.append, should_stop=lambda: len(pieces) >= 30)
    assert turn.interrupted and turn.tokens["generated"] >= 30
    assert turn.timings.generate_s > 0 and turn.to_json()["timings"]["generate_s"] > 0
