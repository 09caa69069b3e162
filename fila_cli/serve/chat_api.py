"""``fila chat`` over HTTP: a session holds a document's pages in the LLM's context.

- ``POST /v1/chat/sessions`` (multipart: ``file`` and the ``fila chat`` options): reads the pages
  (``pages``, default page 1) and answers the session's state, with its ``id``.
- ``POST /v1/chat/sessions/{id}/turns`` (JSON ``{"question", "stream"}``): the ``fila chat --json``
  line for the answer (streamed: ``{"delta"}`` lines, then ``{"record"}``). A follow-up decodes
  only its own words; when other requests used the LLM since the session's last turn, the page
  state (kept in memory) is restored first and the kept turns' text decoded again.
- ``POST /v1/chat/sessions/{id}/pages`` (JSON ``{"page": N, "add": false}``): ``/page N`` or
  ``/page +N``. ``POST .../clear``: ``/clear``. ``GET .../{id}``: the state and the transcript
  (``/save``'s JSON). ``DELETE .../{id}``: ends the session.

Each session has its own document worker (the upload stays open there) and its page state in
memory, so ``--max-sessions`` bounds them; a new session may take the place of one idle for
``SESSION_IDLE_S``.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fila_cli.serve.engine import ServedChat, ask_options
from fila_cli.serve.http_errors import error_response
from fila_cli.serve.responses import next_final, renamed
from fila_cli.serve.scheduler import Job, QueueFull

# A session unused this long may be closed to make room for a new one (seconds).
SESSION_IDLE_S = 600.0


@dataclass
class _Entry:
    session: ServedChat
    directory: Path
    last_used: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self, server, max_sessions: int):
        self.server = server
        self.max_sessions = max_sessions
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._last_activity = time.monotonic()

    def __len__(self) -> int:
        return len(self._entries)

    def idle_s(self) -> float:
        with self._lock:
            last = max([self._last_activity] + [entry.last_used for entry in self._entries.values()])
        return time.monotonic() - last

    def make_room(self) -> None:
        """Close the least recently used session idle for ``SESSION_IDLE_S`` when all places are taken."""
        with self._lock:
            if len(self._entries) < self.max_sessions:
                return
            oldest_id, oldest = min(self._entries.items(), key=lambda item: item[1].last_used)
            if time.monotonic() - oldest.last_used < SESSION_IDLE_S:
                raise QueueFull(len(self._entries), int(SESSION_IDLE_S))
            del self._entries[oldest_id]
        _close_entry(oldest)

    def add(self, session: ServedChat, directory: Path) -> str:
        session_id = uuid.uuid4().hex
        with self._lock:
            self._entries[session_id] = _Entry(session, directory)
        return session_id

    def get(self, session_id: str) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is not None:
                entry.last_used = self._last_activity = time.monotonic()
            return entry

    def remove(self, session_id: str) -> _Entry | None:
        with self._lock:
            return self._entries.pop(session_id, None)

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            _close_entry(entry)


def _close_entry(entry: _Entry) -> None:
    entry.session.close()
    shutil.rmtree(entry.directory, ignore_errors=True)


class TurnRequest(BaseModel):
    question: str
    stream: bool = False


class PageRequest(BaseModel):
    page: int
    add: bool = False


def _not_found(session_id: str):
    return error_response("not_found", f"no chat session {session_id} (ended, or the server restarted); start one "
                                       "with POST /v1/chat/sessions")


def register_chat(app: FastAPI, server, authorized: list) -> None:
    scheduler = server.scheduler
    respond = app.state.respond

    def owned(session: ServedChat, job: Job) -> None:
        """The LLM's context holds ``session``'s pages and turns (restored if another request used it)."""
        job.check()
        if scheduler.llm_owner is not session:
            session.restore()
            scheduler.llm_owner = session

    @app.post("/v1/chat/sessions", dependencies=authorized, status_code=201)
    async def start(
        request: Request,
        file: Annotated[UploadFile, File(description="A PDF, or an image (PNG, JPEG, WebP, TIFF).")],
        pages: Annotated[str | None, Form(description="Pages in the conversation, e.g. 2 or 2,9 (default: 1).")] = None,
        password: Annotated[str | None, Form()] = None,
        text_layer: Annotated[bool, Form()] = False,
        temperature: Annotated[float | None, Form()] = None,
        top_p: Annotated[float | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        max_tokens: Annotated[int | None, Form()] = None,
    ):
        """Start a conversation about the upload: its pages are read into the LLM's context once."""
        options = ask_options(pages=pages, password=password, text_layer=text_layer, together=True,
                              temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens)
        server.sessions.make_room()
        directory = server.new_upload_dir()
        try:
            path, name = await server.save_upload(file, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        notices: list[str] = []

        def open_session(job: Job) -> dict[str, Any]:
            job.check()
            worker = server.engine.new_worker()
            try:
                session = server.engine.chat(worker, path, name, options, on_notice=notices.append)
            except BaseException:
                worker.close()
                raise
            scheduler.llm_owner = session
            session_id = server.sessions.add(session, directory)
            return {"id": session_id, **session.state()}

        job = Job(asyncio.get_running_loop())
        try:
            scheduler.submit_llm(job, open_session)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        kind, value = await _final(job, request)
        if kind == "error":
            shutil.rmtree(directory, ignore_errors=True)
            return error_response(*renamed(value, path, name))
        response = dict(value)
        response["notices"] = notices
        return JSONResponse(response, status_code=201)

    @app.post("/v1/chat/sessions/{session_id}/turns", dependencies=authorized)
    async def turn(session_id: str, body: TurnRequest, request: Request):
        """A question in the conversation: the `fila chat --json` line (streamed: deltas, then the line)."""
        entry = server.sessions.get(session_id)
        if entry is None:
            return _not_found(session_id)
        session = entry.session

        def answer(job: Job) -> dict[str, Any]:
            owned(session, job)

            def on_text(piece: str) -> None:
                if body.stream:
                    job.emit("delta", piece)

            return session.turn(body.question, on_text=on_text, should_stop=lambda: job.cancelled)

        job = Job(asyncio.get_running_loop())
        scheduler.submit_llm(job, answer)
        return await respond(job, request, Path(session.upload), session.file, body.stream, None)

    @app.post("/v1/chat/sessions/{session_id}/pages", dependencies=authorized)
    async def page(session_id: str, body: PageRequest, request: Request):
        """`/page N` (move) or, with add, `/page +N`: the session's state after."""
        entry = server.sessions.get(session_id)
        if entry is None:
            return _not_found(session_id)
        session = entry.session

        def move(job: Job) -> dict[str, Any]:
            owned(session, job)
            try:
                (session.add_page if body.add else session.go_to_page)(body.page)
            except BaseException:
                session.restore()  # a page that failed to load leaves the session as it was
                raise
            return session.state()

        return await _run(session, move, request)

    @app.post("/v1/chat/sessions/{session_id}/clear", dependencies=authorized)
    async def clear(session_id: str, request: Request):
        """`/clear`: forget the conversation; the pages stay."""
        entry = server.sessions.get(session_id)
        if entry is None:
            return _not_found(session_id)
        session = entry.session

        def forget(job: Job) -> dict[str, Any]:
            owned(session, job)
            session.clear()
            return session.state()

        return await _run(session, forget, request)

    @app.get("/v1/chat/sessions/{session_id}", dependencies=authorized)
    async def show(session_id: str):
        """The session's state and its transcript (what `/save` writes)."""
        entry = server.sessions.get(session_id)
        if entry is None:
            return _not_found(session_id)
        return {**entry.session.state(), "transcript": entry.session.transcript()}

    @app.delete("/v1/chat/sessions/{session_id}", dependencies=authorized)
    async def end(session_id: str):
        """End the session: its worker and page state are freed."""
        entry = server.sessions.remove(session_id)
        if entry is None:
            return _not_found(session_id)
        if scheduler.llm_owner is entry.session:
            scheduler.llm_owner = None
        await asyncio.to_thread(_close_entry, entry)
        return {"id": session_id, "ended": True}

    async def _run(session: ServedChat, call, request: Request):
        job = Job(asyncio.get_running_loop())
        scheduler.submit_llm(job, call)
        kind, value = await _final(job, request)
        if kind == "error":
            return error_response(*renamed(value, Path(session.upload), session.file))
        return value

    async def _final(job: Job, request: Request):
        return await next_final(job, request)
