"""How a job's outcome becomes an HTTP response: JSON, JSON lines, errors naming the client's file."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from fila_cli.errors import FilaError
from fila_cli.serve.engine import WorkerFailure
from fila_cli.serve.http_errors import STATUS_BY_KIND, error_body
from fila_cli.serve.scheduler import Cancelled, Job, Stopping

# How often a handler waiting for a non-streamed answer looks whether its client is still there.
DISCONNECT_POLL_S = 0.25
NDJSON = "application/x-ndjson"


def renamed(error: BaseException, path: Path, name: str) -> tuple[str, str]:
    """(kind, message) of ``error``, naming the upload as its client did, not by its place here."""
    if isinstance(error, (FilaError, WorkerFailure)):
        kind, message = error.kind, str(error)
    elif isinstance(error, Cancelled):
        kind, message = "cancelled", "the request was cancelled"
    elif isinstance(error, Stopping):
        kind, message = "stopping", "the server is shutting down"
    else:
        kind, message = "error", f"{name}: unexpected {type(error).__name__}: {error}"
    return kind, message.replace(str(path), name)


async def next_final(job: Job, request: Request) -> tuple[str, Any]:
    """The job's record or error, skipping deltas; the job is cancelled if the client goes away."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise Cancelled from None
            continue
        if kind != "delta":
            return kind, value


def ndjson(item: dict[str, Any]) -> bytes:
    return (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")


# The record of a request that got no answer, from its error's (kind, message): ``fila ask --json``'s
# failed record (``Engine.failed_record``), sent beside the error so a client writes what the CLI writes.
FailedRecord = Callable[[str, str], dict[str, Any]]


def error_content(kind: str, message: str, failed: FailedRecord | None = None) -> dict[str, Any]:
    body = error_body(kind, message)
    if failed is not None:
        body["record"] = failed(kind, message)
    return body


async def stream_events(job: Job, first: tuple[str, Any], path: Path, name: str,
                        cleanup: Path | None, failed: FailedRecord | None = None) -> AsyncIterator[bytes]:
    """The job's events as JSON lines; a client that goes away cancels the job (Starlette cancels
    this generator when it sees the disconnect)."""
    try:
        event = first
        while True:
            kind, value = event
            if kind == "delta":
                yield ndjson({"delta": value})
            elif kind == "record":
                yield ndjson({"record": value})
                return
            else:
                yield ndjson(error_content(*renamed(value, path, name), failed))
                return
            event = await job.events.get()
    finally:
        job.cancel()  # a no-op once finished
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


def final_response(kind: str, value: Any, path: Path, name: str, failed: FailedRecord | None = None) -> JSONResponse:
    if kind == "record":
        return JSONResponse(value)
    kind, message = renamed(value, path, name)
    return JSONResponse(error_content(kind, message, failed), status_code=STATUS_BY_KIND.get(kind, 500))
