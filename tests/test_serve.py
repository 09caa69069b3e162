"""`fila serve` end to end: a real server process on loopback (or a Unix socket), real HTTP clients
(httpx, the official openai client, the CLI's own --server), the tiny model built at test time.

What must hold: the server answers exactly what `fila ask --json` answers; concurrent requests are
each answered once, with their own document's answer; a hostile or oversized upload, a full queue
and a missing API key each get their documented status and JSON error, and the server answers the
next request; a client that goes away frees the LLM; SIGTERM drains and exits 0.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from fila_cli.errors import ExitCode
from fila_cli.qa.records import RECORD_KEYS
from tests.helpers.bad_documents import make_good_pdf, write_corpus
from tests.helpers.serve_process import ServeProcess
from tests.helpers.tiny_bundle import build_tiny_bundle
from tests.helpers.tiny_vision import page_image

QUESTION = "What is the total due?"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return make_good_pdf(tmp_path_factory.mktemp("docs") / "report.pdf",
                         ["Welcome to the annual report", "The total due is 1,234.00 EUR", "Signed by Ada"])


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    process = ServeProcess(bundle, "--max-upload-mb", 1, cache_dir=tmp_path_factory.mktemp("serve") / "cache")
    yield process.wait_ready()
    assert process.stop() == 0, process.output()


def fila(*args, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "fila_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def post_ask(client: httpx.Client, path, question: str = QUESTION, **fields):
    with open(path, "rb") as handle:
        data = {"question": question, **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}}
        return client.post("/v1/ask", data=data, files={"file": (path.name, handle)})


def same_answer(a: dict, b: dict) -> None:
    for key in ("answer", "pages", "tokens", "page_choice", "confidence", "model", "question"):
        assert a[key] == b[key], key


# -- the native API and the CLI through it --


def test_fila_ask_through_the_server_prints_what_a_local_ask_prints(server, bundle, report, tmp_path):
    local = fila("ask", report, QUESTION, "--model", bundle, "--max-tokens", 8, "--json",
                 env={"FILA_CACHE_DIR": str(tmp_path / "local-cache")})
    assert local.returncode == 0, local.stderr
    remote = fila("ask", report, QUESTION, "--max-tokens", 8, "--json", env={"FILA_SERVER": server.url})
    assert remote.returncode == 0, remote.stderr
    local_record, remote_record = json.loads(local.stdout), json.loads(remote.stdout)
    assert list(remote_record) == list(local_record) == list(RECORD_KEYS), "the one record schema, in its order"
    assert {k: v for k, v in remote_record.items() if k != "timings"} == \
        {k: v for k, v in local_record.items() if k != "timings"}
    assert remote_record["file"] == str(report) and remote_record["error"] is None
    assert remote_record["pages"] == [2], "the server chooses pages as fila ask does"
    assert "loading" not in remote.stderr, "no model loads in the client"
    # An error is the CLI's: same line, same exit code, the same failed record on stdout (the
    # server's, naming the server's model, though the client named none).
    local_bad = fila("ask", report, QUESTION, "--model", bundle, "--pages", 9, "--json")
    remote_bad = fila("ask", report, QUESTION, "--pages", 9, "--json", "--server", server.url)
    assert remote_bad.returncode == local_bad.returncode == ExitCode.DOCUMENT
    assert remote_bad.stderr.strip().splitlines()[-1] == local_bad.stderr.strip().splitlines()[-1]
    local_failed, remote_failed = json.loads(local_bad.stdout), json.loads(remote_bad.stdout)
    assert remote_failed == local_failed and remote_failed["error"]["kind"] == "document"
    assert remote_failed["model"] == remote_record["model"]


def test_ask_streams_deltas_then_the_record(server, report):
    with server.client() as client, open(report, "rb") as handle:
        lines = []
        with client.stream("POST", "/v1/ask", data={"question": QUESTION, "stream": "true", "max_tokens": "8"},
                           files={"file": ("report.pdf", handle)}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in response.iter_lines() if line]
        whole = post_ask(client, report, max_tokens=8).json()
    deltas = [line["delta"] for line in lines[:-1]]
    record = lines[-1]["record"]
    assert deltas and all(set(line) == {"delta"} for line in lines[:-1])
    assert "".join(deltas).strip() == record["answer"]
    same_answer(record, whole)


def test_second_question_on_a_page_skips_its_prefill(server, report):
    with server.client() as client:
        first = post_ask(client, report, "Who signed it?", pages=3, max_tokens=4).json()
        second = post_ask(client, report, "What is on this page?", pages=3, max_tokens=4).json()
    assert first["timings"]["prefill_s"] > 0
    # The page's prefix state is reused: only the question's few tokens are decoded.
    assert second["timings"]["encode_s"] == 0.0, "the page's tokens come from the cache"
    assert second["timings"]["prefill_s"] < first["timings"]["prefill_s"]


def test_models_and_health(server):
    with server.client() as client:
        health = client.get("/health").json()
        models = client.get("/v1/models").json()
        docs = client.get("/openapi.json")
    assert health["status"] == "ok" and health["model"] == models["data"][0]["id"]
    assert models["object"] == "list" and models["data"][0]["n_ctx"] > 0
    assert "/v1/ask" in docs.json()["paths"] and "/v1/chat/completions" in docs.json()["paths"]


def test_eight_requests_from_four_clients_each_get_their_own_answer(server, tmp_path):
    pictures = []
    for seed in range(4):
        path = tmp_path / f"receipt-{seed}.png"
        page_image(500 + 60 * seed, 400, seed=seed).save(path)
        pictures.append(path)
    with server.client() as client:
        alone = {path.name: post_ask(client, path, max_tokens=6).json() for path in pictures}
    assert len({record["answer"] for record in alone.values()}) > 1, "the documents must tell their answers apart"

    def one_client(index: int) -> list[tuple[str, httpx.Response]]:
        with server.client() as client:
            return [(path.name, post_ask(client, path, max_tokens=6)) for path in (pictures[index], pictures[3 - index])]

    with ThreadPoolExecutor(4) as pool:
        results = [item for batch in pool.map(one_client, range(4)) for item in batch]
    assert len(results) == 8
    for name, response in results:
        assert response.status_code == 200, response.text
        record = response.json()
        assert record["file"] == name
        same_answer(record, alone[name])


# -- bad input, limits, keys --


def test_hostile_uploads_cost_their_request_never_the_server(server, report, tmp_path):
    corpus = write_corpus(tmp_path / "bad")
    with server.client() as client:
        for name in ("truncated_head.pdf", "encrypted.pdf", "bomb.png", "text_named.pdf"):
            response = post_ask(client, corpus[name].path, max_tokens=4)
            assert response.status_code == 422, (name, response.text)
            error = response.json()["error"]
            assert error["kind"] == "document", (name, error)
            assert error["message"].startswith(name), "the message names the file as the client did"
            assert str(tmp_path) not in error["message"] and "fila-serve-" not in error["message"]
        assert post_ask(client, report, max_tokens=4).status_code == 200, "the server answers the next request"


def test_oversized_upload_is_413(server, report, tmp_path):
    big = tmp_path / "big.pdf"
    big.write_bytes(report.read_bytes() + b"\0" * (2 * 1024**2))  # past --max-upload-mb 1
    with server.client() as client:
        response = post_ask(client, big)
        assert response.status_code == 413
        assert response.json()["error"]["kind"] == "too_large" and "--max-upload-mb" in response.json()["error"]["message"]
        assert post_ask(client, report, max_tokens=4).status_code == 200


def test_usage_errors_are_400_with_the_cli_message(server, report):
    with server.client() as client:
        response = post_ask(client, report, pages="3-1")
        assert response.status_code == 400
        assert response.json()["error"] == {"kind": "usage", "type": "usage",
                                            "message": "bad page selection '3-1': range 3-1 runs backwards; write 1-3"}
        missing = client.post("/v1/ask", data={"question": QUESTION})
        assert missing.status_code == 400 and missing.json()["error"]["kind"] == "usage"


def test_a_full_queue_answers_503_with_retry_after(bundle, report, tmp_path):
    scans = tmp_path / "scans.pdf"
    make_good_pdf(scans, [f"scan {i}" for i in range(6)], scanned_page=None)
    process = ServeProcess(bundle, "--max-queue", 1, cache_dir=tmp_path / "cache")
    try:
        process.wait_ready()

        def ask(_):
            with process.client() as client:
                return post_ask(client, scans, "Which page?", max_tokens=40)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(ask, range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}, statuses
        full = next(r for r in responses if r.status_code == 503)
        assert int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["kind"] == "overloaded"
        with process.client() as client:
            assert post_ask(client, report, max_tokens=4).status_code == 200
    finally:
        assert process.stop() == 0, process.output()


def test_binding_beyond_loopback_needs_a_key(bundle, report, tmp_path):
    refused = fila("serve", "--model", bundle, "--host", "0.0.0.0", "--port", 0, env={"FILA_API_KEY": ""})
    assert refused.returncode == ExitCode.USAGE
    assert refused.stderr.count("\n") == 1 and "--api-key" in refused.stderr
    process = ServeProcess(bundle, cache_dir=tmp_path / "cache", host="0.0.0.0", env={"FILA_API_KEY": "sesame"})
    try:
        process.wait_ready()
        with process.client() as client:
            assert client.get("/v1/models").status_code == 401
            wrong = client.get("/v1/models", headers={"Authorization": "Bearer guess"})
            assert wrong.status_code == 401 and wrong.json()["error"]["kind"] == "unauthorized"
            assert post_ask(client, report).status_code == 401
            assert client.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        remote = fila("ask", report, QUESTION, "--max-tokens", 4, "--json", "--server", process.url,
                      env={"FILA_API_KEY": "sesame"})
        assert remote.returncode == 0, remote.stderr
    finally:
        assert process.stop() == 0, process.output()


# -- the OpenAI-compatible API, through the official client --


def data_url(path, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_the_openai_client_gets_streamed_and_whole_answers(server, report, tmp_path):
    picture = tmp_path / "receipt.png"
    page_image(700, 500, seed=3).save(picture)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                              {"type": "image_url", "image_url": {"url": data_url(picture, "image/png")}}]}]
    whole = client.chat.completions.create(model="fila", messages=messages, max_tokens=6)
    with server.client() as http:
        native = post_ask(http, picture, max_tokens=6).json()
    assert whole.choices[0].message.content == native["answer"]
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens == native["tokens"]["generated"]
    assert whole.usage.prompt_tokens == native["tokens"]["prompt"]
    chunks = list(client.chat.completions.create(model="fila", messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == native["answer"]
    assert chunks[-1].usage.completion_tokens == native["tokens"]["generated"]
    # A PDF as a data URL: its pages are chosen as fila ask chooses them, and the response says which.
    pdf_messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                  {"type": "image_url", "image_url": {"url": data_url(report, "application/pdf")}}]}]
    from_pdf = client.chat.completions.create(model="fila", messages=pdf_messages, max_tokens=4)
    assert from_pdf.model_extra["fila"]["pages"] == [2]


def test_the_openai_api_refuses_what_it_cannot_read(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="no image_url part"):
        client.chat.completions.create(model="fila", messages=[{"role": "user", "content": "hello"}])
    with pytest.raises(openai.BadRequestError, match="--allow-fetch"):
        client.chat.completions.create(model="fila", messages=[{"role": "user", "content": [
            {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])


# -- chat sessions --


def test_a_chat_session_decodes_the_page_once(server, report):
    with server.client() as client, open(report, "rb") as handle:
        started = client.post("/v1/chat/sessions", data={"pages": "2", "max_tokens": "6"},
                              files={"file": ("report.pdf", handle)})
        assert started.status_code == 201, started.text
        session = started.json()
        assert session["pages"] == [2] and session["visual_tokens"] > 0
        turns = f"/v1/chat/sessions/{session['id']}/turns"
        first = client.post(turns, json={"question": QUESTION}).json()
        post_ask(client, report, "Who signed it?", pages=3, max_tokens=4)  # another request uses the LLM between
        second = client.post(turns, json={"question": "And without VAT?"}).json()
        assert first["turn"] == 1 and second["turn"] == 2
        assert first["file"] == second["file"] == "report.pdf"
        assert second["tokens"]["visual_decoded"] == 0, "the page state is restored, not decoded again"
        moved = client.post(f"/v1/chat/sessions/{session['id']}/pages", json={"page": 3}).json()
        assert moved["pages"] == [3]
        bad = client.post(f"/v1/chat/sessions/{session['id']}/pages", json={"page": 7})
        assert bad.status_code == 422 and bad.json()["error"]["kind"] == "document"
        transcript = client.get(f"/v1/chat/sessions/{session['id']}").json()["transcript"]
        assert [t["question"] for t in transcript["turns"]] == [QUESTION, "And without VAT?"]
        assert client.delete(f"/v1/chat/sessions/{session['id']}").status_code == 200
        assert client.post(turns, json={"question": "Still there?"}).status_code == 404


# -- lifecycle: disconnects, SIGTERM, Unix sockets --


def test_a_client_that_goes_away_frees_the_llm(server, report):
    with server.client() as client:
        full = post_ask(client, report, "Describe the page at length.", pages=1, max_tokens=1500).json()
    full_s = full["timings"]["generate_s"]
    assert full["tokens"]["generated"] > 200, "the answer must be long enough to interrupt"
    with server.client() as client, open(report, "rb") as handle:
        with client.stream("POST", "/v1/ask", data={"question": "Describe the page at length.", "pages": "1",
                                                    "max_tokens": "1500", "stream": "true"},
                           files={"file": ("report.pdf", handle)}) as response:
            for _ in response.iter_lines():
                break  # the first delta: generation is under way; then the client leaves
        left = time.monotonic()
    with server.client() as client:
        while client.get("/health").json()["queue"]["in_flight"]:
            time.sleep(0.01)
        freed_s = time.monotonic() - left
    assert freed_s < max(0.5, full_s / 2), (freed_s, full_s)


def test_sigterm_during_a_request_exits_cleanly(bundle, report, tmp_path):
    process = ServeProcess(bundle, cache_dir=tmp_path / "cache")
    process.wait_ready()
    outcome: dict = {}

    def ask():
        try:
            with process.client() as client:
                outcome["response"] = post_ask(client, report, max_tokens=200, pages=1)
        except httpx.HTTPError as error:
            outcome["error"] = error

    asking = threading.Thread(target=ask)
    asking.start()
    with process.client() as client:
        while not client.get("/health").json()["queue"]["in_flight"]:
            time.sleep(0.01)
    code = process.stop()
    asking.join(60)
    assert code == 0, process.output()
    assert "response" in outcome and outcome["response"].status_code == 200, outcome
    assert "Traceback" not in process.output()


def test_unix_socket_is_private_and_answers_the_cli(bundle, report, tmp_path):
    socket_path = tmp_path / "fila.sock"
    process = ServeProcess(bundle, cache_dir=tmp_path / "cache", socket_path=socket_path)
    try:
        process.wait_ready()
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        remote = fila("ask", report, QUESTION, "--max-tokens", 4, "--json", "--server", process.url)
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout)["pages"] == [2]
    finally:
        assert process.stop() == 0, process.output()
    assert not socket_path.exists(), "the server removes its socket"


# -- the CLI's other commands through the server --


def test_fila_batch_through_the_server_writes_the_local_records(server, bundle, report, tmp_path):
    picture = tmp_path / "receipt.png"
    page_image(600, 400, seed=5).save(picture)
    args = [report, picture, tmp_path / "missing.pdf", "-q", QUESTION, "-q", "Who signed it?", "--max-tokens", 5]
    local = fila("batch", *args, "--model", bundle, "-o", tmp_path / "local.jsonl",
                 env={"FILA_CACHE_DIR": str(tmp_path / "local-cache")})
    remote = fila("batch", *args, "--server", server.url, "-o", tmp_path / "remote.jsonl")
    assert remote.returncode == local.returncode == 1, remote.stderr  # the missing file fails
    assert remote.stderr.strip().splitlines()[-1] == local.stderr.strip().splitlines()[-1]
    local_records = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    remote_records = [json.loads(line) for line in (tmp_path / "remote.jsonl").read_text().splitlines()]
    assert len(remote_records) == len(local_records) == 6
    for mine, theirs in zip(remote_records, local_records):  # the same records, but for the time they took
        assert list(mine) == list(theirs) == [*RECORD_KEYS, "sha256"]
        assert {k: v for k, v in mine.items() if k != "timings"} == {k: v for k, v in theirs.items() if k != "timings"}
    # --resume: nothing left to do but the failed records, which fail again.
    resumed = fila("batch", *args, "--server", server.url, "-o", tmp_path / "remote.jsonl", "--resume")
    assert "4 already done" in resumed.stderr, resumed.stderr
    assert len((tmp_path / "remote.jsonl").read_text().splitlines()) == 6


def test_fila_chat_through_the_server_answers_as_a_local_chat(server, bundle, report, tmp_path):
    questions = f"{QUESTION}\n/page 3\nWho signed it?\n/save {tmp_path / 'talk.json'}\n"
    local = subprocess.run([sys.executable, "-m", "fila_cli", "chat", str(report), "--pages", "2", "--max-tokens", "5",
                            "--model", str(bundle)], input=questions, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "FILA_CACHE_DIR": str(tmp_path / "local-cache")})
    remote = subprocess.run([sys.executable, "-m", "fila_cli", "chat", str(report), "--pages", "2", "--max-tokens", "5",
                             "--server", server.url], input=questions, capture_output=True, text=True, timeout=300)
    assert remote.returncode == local.returncode == 0, remote.stderr
    local_lines = [json.loads(line) for line in local.stdout.splitlines()]
    remote_lines = [json.loads(line) for line in remote.stdout.splitlines()]
    assert [line["turn"] for line in remote_lines] == [1, 2]
    for mine, theirs in zip(remote_lines, local_lines):  # the same lines, but for the time they took
        assert list(mine) == list(theirs) == [*RECORD_KEYS, "turn", "interrupted", "dropped_turns"]
        assert {k: v for k, v in mine.items() if k != "timings"} == {k: v for k, v in theirs.items() if k != "timings"}
    assert len(json.loads((tmp_path / "talk.json").read_text())["turns"]) == 2


# -- keep-alive --


def keep_alive_ask(bundle, report, runtime, question=QUESTION, keep_alive="30s"):
    return fila("ask", report, question, "--model", bundle, "--max-tokens", 4, "--json",
                env={"XDG_RUNTIME_DIR": str(runtime), "FILA_KEEP_ALIVE": keep_alive})


def keep_alive_server(runtime) -> tuple[int, str]:
    (socket_path,) = (runtime / "fila").glob("serve-*.sock")
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://fila") as client:
        return client.get("/health").json()["pid"], str(socket_path)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped by its parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_keep_alive_reuses_the_model_then_exits_when_idle(bundle, report, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    first = keep_alive_ask(bundle, report, runtime)
    assert first.returncode == 0, first.stderr
    pid, socket_path = keep_alive_server(runtime)
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    second = keep_alive_ask(bundle, report, runtime, "Who signed it?")
    assert second.returncode == 0, second.stderr
    assert keep_alive_server(runtime)[0] == pid, "the second ask used the running server"
    assert "loading" not in second.stderr
    log = (runtime / "fila").glob("serve-*.log")
    assert sum(text.count("fila serve: ") for text in (p.read_text() for p in log)) == 1, "one server started"
    deadline = time.monotonic() + 120
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not process_alive(pid), "the server exits after the idle time"
    assert not os.path.exists(socket_path)


def test_keep_alive_replaces_a_killed_servers_socket(bundle, report, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    assert keep_alive_ask(bundle, report, runtime).returncode == 0
    pid, socket_path = keep_alive_server(runtime)
    os.kill(pid, 9)
    while process_alive(pid):
        time.sleep(0.1)
    assert os.path.exists(socket_path), "a killed server leaves its socket behind"
    again = keep_alive_ask(bundle, report, runtime)
    assert again.returncode == 0, again.stderr
    new_pid, _ = keep_alive_server(runtime)
    assert new_pid != pid
    os.kill(new_pid, 15)


def test_parallel_answers_waiting_questions_side_by_side(bundle, report, tmp_path):
    pictures = []
    for seed in range(6):
        path = tmp_path / f"receipt-{seed}.png"
        page_image(400 + 40 * seed, 400, seed=seed).save(path)
        pictures.append(path)
    process = ServeProcess(bundle, "--parallel", 3, cache_dir=tmp_path / "cache")
    try:
        process.wait_ready()
        with process.client() as client:  # one at a time; the pages' tokens are cached after
            alone = {path.name: post_ask(client, path, max_tokens=200).json() for path in pictures}

        def ask(path):
            with process.client() as client:
                return path.name, post_ask(client, path, max_tokens=200)

        # A long answer keeps the LLM busy while the cached pages are made ready: those questions wait for it.
        with process.client() as client, ThreadPoolExecutor(6) as pool:
            long = pool.submit(post_ask, client, report, "Describe the page at length.", pages=1, max_tokens=1500)
            while not client.get("/health").json()["queue"]["in_flight"]:
                time.sleep(0.01)
            results = list(pool.map(ask, pictures))
            assert long.result().status_code == 200
        with process.client() as client:
            side_by_side = client.get("/health").json()["queue"]["answered_side_by_side"]
    finally:
        assert process.stop() == 0, process.output()
    assert len(results) == 6
    for name, response in results:
        assert response.status_code == 200, response.text
        record = response.json()
        assert record["file"] == name
        # The same prompt for the same document; the answer itself may differ where two candidates
        # are nearly tied (LlamaBackend.generate_many: flash attention's kernels for several sequences).
        assert record["pages"] == alone[name]["pages"] and record["tokens"]["visual"] == alone[name]["tokens"]["visual"]
    assert side_by_side >= 2, "waiting questions were answered side by side"


def test_keep_alive_says_why_its_server_could_not_start(report, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    missing = tmp_path / "no-such-bundle"
    local = fila("ask", report, QUESTION, "--model", missing, "--json")
    kept = fila("ask", report, QUESTION, "--model", missing, "--json", env={"XDG_RUNTIME_DIR": str(runtime),
                                                                            "FILA_KEEP_ALIVE": "5s"})
    assert kept.returncode == local.returncode == ExitCode.MODEL
    assert kept.stderr.strip().splitlines()[-1] == local.stderr.strip().splitlines()[-1]
    assert not list((runtime / "fila").glob("*.sock")), "nothing is left running"
