"""The HTTP API of ``fila serve`` (FastAPI; its OpenAPI page is at ``/docs``).

Native API, mirroring the CLI:

- ``POST /v1/ask``: a multipart upload (``file``) with the ``fila ask`` options as form fields;
  the ``fila ask --json`` record, or with ``stream=true`` JSON lines: ``{"delta": "..."}`` as the
  answer is generated, then ``{"record": {...}}``. A failure is ``{"error": {...}, "record": {...}}``,
  the record being the failed one ``fila ask --json`` prints.
- ``/v1/chat/sessions``: ``fila chat`` over HTTP (see ``chat_api``).
- ``GET /v1/models``, ``GET /health``.

Plus the OpenAI-compatible ``POST /v1/chat/completions`` (``openai_compat``). Errors are JSON with
the CLI's kinds and messages (``http_errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fila_cli import __version__
from fila_cli.errors import FilaError
from fila_cli.serve.chat_api import Sessions, register_chat
from fila_cli.serve.engine import Engine, ask_options
from fila_cli.serve.http_errors import error_response
from fila_cli.serve.limits import BodyLimit, TooLarge, too_large_message
from fila_cli.serve.openai_compat import register_openai
from fila_cli.serve.responses import NDJSON, FailedRecord, final_response, next_final, stream_events
from fila_cli.serve.scheduler import AskWork, Cancelled, Job, QueueFull, Scheduler, Stopping
from fila_cli.serve.settings import ServeSettings

_UPLOAD_CHUNK_BYTES = 1024 * 1024
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


class Server:
    """What the handlers share: the engine, the queue, the uploads' folder, the settings."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine = engine
        self.settings = settings
        self.scheduler = Scheduler(engine, max_queue=settings.max_queue)
        self.uploads = Path(tempfile.mkdtemp(prefix="fila-serve-"))  # 0700, this server's alone
        self.uvicorn = None  # set by the command: what idle exit asks to stop
        self.sessions = Sessions(self, settings.max_sessions)

    def new_upload_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.uploads))

    async def save_upload(self, upload: UploadFile, directory: Path) -> tuple[Path, str]:
        """The upload, copied to ``directory`` (within the size cap), and the name the client gave it."""
        name = upload.filename or "document"
        suffix = Path(name).suffix
        path = directory / ("document" + (suffix.lower() if _SAFE_SUFFIX.match(suffix) else ""))
        size = 0
        with path.open("wb") as out:
            while chunk := await upload.read(_UPLOAD_CHUNK_BYTES):
                size += len(chunk)
                if size > self.settings.max_upload_bytes:
                    raise TooLarge
                out.write(chunk)
        return path, name

    def write_upload(self, data: bytes, name: str, directory: Path) -> Path:
        if len(data) > self.settings.max_upload_bytes:
            raise TooLarge
        suffix = Path(name).suffix
        path = directory / ("document" + (suffix.lower() if _SAFE_SUFFIX.match(suffix) else ""))
        path.write_bytes(data)
        return path

    def close(self) -> None:
        self.sessions.close()
        self.scheduler.close()
        shutil.rmtree(self.uploads, ignore_errors=True)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    server = Server(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.create_task(_exit_when_idle(server)) if settings.idle_exit_s else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(server.close)

    app = FastAPI(title="fila serve", version=__version__, lifespan=lifespan,
                  description="Answer questions about documents with the loaded FILA model. Native API mirroring "
                              "the CLI (/v1/ask, /v1/chat/sessions) and an OpenAI-compatible /v1/chat/completions.")
    app.state.server = server
    app.add_middleware(BodyLimit, max_upload_bytes=settings.max_upload_bytes)
    _add_error_handlers(app, server)
    authorized = [Depends(_authorization(settings.api_key))]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Whether the server answers, its model and process, and its queue."""
        return {"status": "ok", "model": engine.model_name, "fusion": engine.asker.fusion, "pid": os.getpid(),
                "version": __version__,
                "queue": server.scheduler.status(), "sessions": len(server.sessions),
                "idle_exit_s": settings.idle_exit_s}

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict[str, Any]:
        """The one model this server holds (OpenAI's list shape)."""
        return {"object": "list", "data": [engine.describe()]}

    @app.post("/v1/ask", dependencies=authorized)
    async def ask(
        request: Request,
        file: Annotated[UploadFile, File(description="A PDF, or an image (PNG, JPEG, WebP, TIFF).")],
        question: Annotated[str, Form()],
        pages: Annotated[str | None, Form(description="Pages to read, 1-based, e.g. 1,3-5 (default: fila chooses).")] = None,
        password: Annotated[str | None, Form()] = None,
        text_layer: Annotated[bool, Form()] = False,
        together: Annotated[bool, Form()] = False,
        temperature: Annotated[float | None, Form()] = None,
        top_p: Annotated[float | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        max_tokens: Annotated[int | None, Form()] = None,
        stream: Annotated[bool, Form(description="JSON lines: text deltas, then the record.")] = False,
    ):
        """`fila ask` on the upload: the `fila ask --json` record (or, streamed, deltas then the record)."""
        question = question.strip()
        if not question:
            return error_response("usage", "the question is empty")
        options = ask_options(pages=pages, password=password, text_layer=text_layer, together=together,
                              temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens)
        directory = server.new_upload_dir()
        try:
            path, name = await server.save_upload(file, directory)
            job = Job(asyncio.get_running_loop())
            server.scheduler.submit_ask(job, AskWork(path, name, question, options, stream))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return await respond(job, request, path, name, stream, directory,
                             failed=lambda kind, message: engine.failed_record(name, question, kind, message))

    async def respond(job: Job, request: Request, path: Path, name: str, stream: bool, directory: Path | None,
                      failed: FailedRecord | None = None):
        """The job's answer as JSON, or streamed as JSON lines (an error before the first delta
        keeps its HTTP status). ``failed``: the record an error comes with."""
        handed_over = False
        try:
            if not stream:
                kind, value = await next_final(job, request)
                return final_response(kind, value, path, name, failed)
            first = await job.events.get()
            if first[0] == "error":
                return final_response(*first, path, name, failed)
            handed_over = True
            return StreamingResponse(stream_events(job, first, path, name, directory, failed), media_type=NDJSON)
        finally:
            if not handed_over:
                job.cancel()
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)

    app.state.respond = respond
    register_chat(app, server, authorized)
    register_openai(app, server, authorized)
    return app


def _authorization(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise _Unauthorized

    return check


class _Unauthorized(Exception):
    pass


def _add_error_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, error: _Unauthorized) -> JSONResponse:
        return error_response("unauthorized", "missing or wrong API key: send Authorization: Bearer KEY "
                                              "(the key fila serve was started with)",
                              headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(FilaError)
    async def fila_error(request: Request, error: FilaError) -> JSONResponse:
        return error_response(error.kind, str(error))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        return error_response("overloaded", str(error), headers={"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(Stopping)
    async def stopping(request: Request, error: Stopping) -> JSONResponse:
        return error_response("stopping", str(error), headers={"Retry-After": "1"})

    @app.exception_handler(TooLarge)
    async def too_large(request: Request, error: TooLarge) -> JSONResponse:
        return error_response("too_large", too_large_message(server.settings.max_upload_bytes))

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, error: Cancelled) -> JSONResponse:
        return error_response("cancelled", "the request was cancelled")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg', '')}"
                             for e in error.errors())
        return error_response("usage", f"bad request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 401: "unauthorized", 413: "too_large"}.get(error.status_code, "usage")
        response = error_response(kind, str(error.detail))
        response.status_code = error.status_code
        return response


async def _exit_when_idle(server: Server) -> None:
    """Ask uvicorn to stop once no request came for ``idle_exit_s`` (a ``--keep-alive`` server)."""
    limit = server.settings.idle_exit_s
    assert limit is not None
    while True:
        await asyncio.sleep(min(1.0, limit / 4))
        if server.scheduler.idle_s() >= limit and server.sessions.idle_s() >= limit and server.uvicorn is not None:
            server.uvicorn.should_exit = True
            return
