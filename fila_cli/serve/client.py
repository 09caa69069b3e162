"""The ``--server`` side of the CLI: ``fila ask`` / ``chat`` / ``batch`` through a running ``fila serve``.

Standard library only (``http.client``), so the CLI needs no HTTP package. ``URL`` is
``http://HOST:PORT`` or ``unix:/path/to.sock``; ``$FILA_API_KEY`` is sent as a Bearer token.

An error the server returns becomes the CLI's error of the same kind and message, so the command
prints the line and exits with the code it would have locally.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fila_cli.atomic_files import write_bytes_atomically
from fila_cli.documents.evidence import Evidence
from fila_cli.documents.page_select import METHOD_ALL
from fila_cli.errors import FilaError, UsageError, error_from_kind
from fila_cli.qa.records import Answer, chat_record, failed_record
from fila_cli.qa.timings import Timings

# Long enough for a cold page on a CPU; the server cancels a request whose client gives up.
DEFAULT_TIMEOUT_S = 3600.0
_CHUNK_BYTES = 1024 * 1024


class RemoteError(FilaError):
    """An error kind the CLI has no class for (timeout, crash, overloaded, ...), as the server said it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ServerUnreachable(UsageError):
    """No fila server answers at the URL."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("fila", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _multipart(fields: dict[str, Any], file: Path, filename: str) -> tuple[str, int, Iterator[bytes]]:
    """(content type, length, body chunks): the form fields, then the file read in chunks."""
    boundary = uuid.uuid4().hex
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items() if value is not None)
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = file.stat().st_size

    def chunks() -> Iterator[bytes]:
        yield head
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK_BYTES):
                yield chunk
        yield tail

    return f"multipart/form-data; boundary={boundary}", len(head) + size + len(tail), chunks()


def _form_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


class ServerClient:
    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.url = url
        self.api_key = api_key if api_key is not None else os.environ.get("FILA_API_KEY")
        self.timeout_s = timeout_s
        if url.startswith("unix:"):
            self._unix = url[len("unix:"):]
            self._host = self._port = None
            self._prefix = ""
        else:
            parsed = urllib.parse.urlparse(url)
            if parsed.scheme != "http" or not parsed.hostname:
                raise UsageError(f"--server {url!r}: give http://HOST:PORT or unix:/path/to/socket")
            self._unix = None
            self._host, self._port = parsed.hostname, parsed.port or 80
            self._prefix = parsed.path.rstrip("/")

    def _connection(self) -> http.client.HTTPConnection:
        if self._unix is not None:
            return _UnixConnection(self._unix, self.timeout_s)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _send(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None):
        connection = self._connection()
        try:
            connection.request(method, self._prefix + path, body=body, headers=self._headers(headers))
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ServerUnreachable(f"cannot reach the fila server at {self.url} ({error}); start it with `fila serve`, "
                             "or check --server / $FILA_SERVER") from None
        if response.status >= 400:
            data = response.read()
            connection.close()
            raise _error_of(response.status, data)
        return connection, response

    def request_json(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {} if payload is None else {"Content-Type": "application/json"}
        connection, response = self._send(method, path, body, headers)
        try:
            return json.loads(response.read())
        finally:
            connection.close()

    def health(self) -> dict[str, Any]:
        return self.request_json("GET", "/health")

    def upload(self, path: str, file: Path, filename: str, fields: dict[str, Any],
               on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """POST a multipart upload; with ``on_text`` the answer streams (JSON lines) into it. The record."""
        fields = {name: _form_value(value) for name, value in fields.items()}
        if on_text is not None:
            fields["stream"] = "true"
        content_type, length, chunks = _multipart(fields, file, filename)
        connection, response = self._send("POST", path, chunks, {"Content-Type": content_type,
                                                                  "Content-Length": str(length)})
        try:
            if on_text is None:
                return json.loads(response.read())
            return read_stream(response, on_text)
        finally:
            connection.close()

    def stream_json(self, path: str, payload: dict[str, Any], on_text: Callable[[str], None]) -> dict[str, Any]:
        connection, response = self._send("POST", path, json.dumps({**payload, "stream": True}).encode(),
                                          {"Content-Type": "application/json"})
        try:
            return read_stream(response, on_text)
        finally:
            connection.close()


def read_stream(response: http.client.HTTPResponse, on_text: Callable[[str], None]) -> dict[str, Any]:
    """Read JSON lines: deltas to ``on_text``, then the record (or the error, raised)."""
    while line := response.readline():
        if not line.strip():
            continue
        item = json.loads(line)
        if "delta" in item:
            on_text(item["delta"])
        elif "record" in item:
            return item["record"]
        elif "error" in item:
            raise _error_of(200, json.dumps(item).encode())
    raise RemoteError("error", "the server closed the answer before it was complete")


def _error_of(status: int, data: bytes) -> FilaError:
    """The CLI's error of the kind the server said, with the failed record it sent (``record``;
    None when it sent none), which ``fila ask --json`` prints as its own."""
    try:
        body = json.loads(data)
        error = body["error"]
        kind, message = str(error["kind"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return RemoteError("error", f"the server answered HTTP {status}: {data[:200].decode(errors='replace')}")
    raised = error_from_kind(kind, message) if kind in ("usage", "document", "model") else RemoteError(kind, message)
    raised.record = body.get("record")  # type: ignore[attr-defined]
    return raised


def ask_fields(question: str, options: Any) -> dict[str, Any]:
    """The form fields of ``POST /v1/ask`` for a question and its ``AskOptions``."""
    sampling = options.sampling
    return {"question": question, "pages": options.pages, "password": options.password,
            "text_layer": options.text_layer, "together": options.together, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "seed": sampling.seed, "max_tokens": sampling.max_tokens}


class RemoteAsker:
    """What ``fila ask``'s output code needs of a loaded model, answered by a server."""

    def __init__(self, client: ServerClient):
        self.client = client
        self._model_name: str | None = None

    @property
    def model_name(self) -> str:
        if self._model_name is None:
            self._model_name = self.client.health()["model"]
        return self._model_name

    @property
    def fusion(self) -> bool:
        """Whether the server's model reads pages through FILA fusion (no crop-boundary notice then)."""
        return bool(self.client.health().get("fusion"))

    def ask_record(self, file: Path, question: str, options: Any, on_text: Callable[[str], None] | None = None,
                   *, name: str | None = None) -> dict[str, Any]:
        return self.client.upload("/v1/ask", Path(file), name or str(file), ask_fields(question, options), on_text)

    def ask(self, file: Path, question: str, options: Any, on_text: Callable[[str], None] | None = None,
            on_page: Callable[[int, int], None] | None = None) -> Answer:
        return answer_of(self.ask_record(file, question, options, on_text))


def answer_of(record: dict[str, Any]) -> Answer:
    """The ``Answer`` a server's ``fila ask --json`` record was made from: its ``to_json()`` is the
    record again, and ``fila ask``'s output reads it as it reads a local answer."""
    choice = record.get("page_choice") or {}
    return Answer(file=record["file"], question=record["question"], answer=record["answer"], pages=list(record["pages"]),
                  confidence=record["confidence"], model=record["model"], timings=Timings(**record["timings"]),
                  tokens=dict(record["tokens"]), page_reason=choice.get("detail", ""),
                  page_method=choice.get("method", METHOD_ALL), warnings=list(record["warnings"] or []),
                  evidence=Evidence.from_json(record))


class _Stopped(Exception):
    """The user asked to stop the answer (Ctrl-C): the connection is closed, the server cancels it."""


class _RemotePage:
    def __init__(self, index: int, n_tokens: int):
        self.index = index
        self.visual = range(n_tokens)  # what the chat's output reads of it: its length


class _RemoteModel:
    def __init__(self, model_name: str):
        self.model_name = model_name

    @property
    def encoder(self):
        raise UsageError("/crops draws the page here, without the model: use `fila crops FILE --page N` beside --server")


class _RemoteBackend:
    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx


class RemoteChatSession:
    """What ``fila chat``'s output code needs of a ``ChatSession``, held by a server's chat session."""

    def __init__(self, client: ServerClient, file: Path, options: Any, document: Any):
        self.client = client
        self.document = document  # opened here by the CLI already: its page count
        self.file = str(file)
        self.options = options
        sampling = options.sampling
        fields = {"pages": options.pages, "password": options.password, "text_layer": options.text_layer,
                  "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
                  "max_tokens": sampling.max_tokens}
        fields = {name: _form_value(value) for name, value in fields.items()}
        content_type, length, chunks = _multipart(fields, Path(file), self.file)
        connection, response = client._send("POST", "/v1/chat/sessions", chunks,
                                            {"Content-Type": content_type, "Content-Length": str(length)})
        try:
            state = json.loads(response.read())
        finally:
            connection.close()
        self.id = state["id"]
        self.notices = list(state.get("notices", []))
        self.asker = _RemoteModel(state["model"])
        self._update(state)
        self.history: list[Any] = []

    def _update(self, state: dict[str, Any]) -> None:
        self.state = state
        self.backend = _RemoteBackend(state["n_ctx"])
        per_page = state["visual_tokens"] // max(1, len(state["pages"]))
        self.pages = [_RemotePage(number - 1, per_page) for number in state["pages"]]

    @property
    def page_numbers(self) -> list[int]:
        return list(self.state["pages"])

    @property
    def n_visual(self) -> int:
        return self.state["visual_tokens"]

    @property
    def context_used(self) -> int:
        return self.state["context_used"]

    @property
    def turns_in_context(self) -> int:
        return self.state["turns_in_context"]

    @property
    def warnings(self) -> list[str]:
        return list(self.state["warnings"])

    def _path(self, tail: str = "") -> str:
        return f"/v1/chat/sessions/{self.id}{tail}"

    def ask(self, question: str, on_text: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None):
        from fila_cli.serve.engine import turn_from_record

        question = question.strip()
        if not question:
            raise UsageError("the question is empty")
        streamed: list[str] = []

        def take(piece: str) -> None:
            if should_stop is not None and should_stop():
                raise _Stopped
            streamed.append(piece)
            if on_text is not None:
                on_text(piece)

        try:
            record = self.client.stream_json(self._path("/turns"), {"question": question}, take)
        except _Stopped:  # the server keeps the turn, stopped; what it streamed so far is the answer here
            record = chat_record(self._stopped_answer(question, "".join(streamed).strip()), len(self.history) + 1,
                                 True, 0)
        self._update(self.client.request_json("GET", self._path()))
        turn = turn_from_record(record)
        self.history.append((turn, record))
        return turn

    def _stopped_answer(self, question: str, text: str) -> Answer:
        choice = self.state.get("page_choice") or {}
        return Answer(file=self.file, question=question, answer=text, pages=self.page_numbers, confidence=None,
                      model=self.asker.model_name, timings=Timings(),
                      tokens={"visual": self.n_visual, "prompt": 0, "visual_decoded": 0, "generated": 0},
                      page_reason=choice.get("detail", ""), page_method=choice.get("method", METHOD_ALL),
                      warnings=self.warnings)

    def record(self, turn: Any) -> dict[str, Any]:
        """The ``fila chat --json`` line of ``turn``: the server's (``ChatSession.record``)."""
        return next(record for known, record in self.history if known is turn)

    def failed_record(self, question: str, error: FilaError) -> dict[str, Any]:
        """The line of a question that got no answer, as ``ChatSession.failed_record`` makes it."""
        return chat_record(failed_record(self.file, question, self.asker.model_name, error.kind, str(error)),
                           None, None, None)

    def go_to_page(self, number: int) -> None:
        self._update(self.client.request_json("POST", self._path("/pages"), {"page": number}))

    def add_page(self, number: int) -> None:
        self._update(self.client.request_json("POST", self._path("/pages"), {"page": number, "add": True}))

    def clear(self) -> None:
        self._update(self.client.request_json("POST", self._path("/clear")))

    def recover(self) -> None:
        """Nothing to do here: the server restored its session when the answer stopped."""

    def transcript(self) -> dict[str, Any]:
        return self.client.request_json("GET", self._path())["transcript"]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise UsageError(f"{path}: the transcript is JSON; name it *.json")
        try:
            write_bytes_atomically(path, (json.dumps(self.transcript(), ensure_ascii=False, indent=2) + "\n").encode())
        except OSError as error:
            raise UsageError(f"{path}: cannot write the transcript ({error.strerror or error}); check the folder") from None
        return path

    def close(self) -> None:
        try:
            self.client.request_json("DELETE", self._path())
        except FilaError:
            pass
