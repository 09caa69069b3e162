"""Errors over HTTP: the CLI's error kinds and messages, with the status each kind maps to.

Every error the server returns is JSON::

    {"error": {"kind": "document", "message": "report.pdf: is encrypted; pass --password", "type": "document"}}

``kind`` is the CLI's (``fila batch`` records the same kinds); ``type`` repeats it where OpenAI
clients look for it. The ``--server`` client raises the CLI's error of that kind, so it prints the
same line and exits with the same code as a local run.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# kind -> HTTP status. The document's fault (unreadable, hostile, too slow to render, past the
# model's limits) is 422: the request was well formed, its content cannot be answered.
STATUS_BY_KIND = {
    "usage": 400,
    "unauthorized": 401,
    "not_found": 404,
    "too_large": 413,
    "document": 422,
    "model": 422,
    "timeout": 422,
    "crash": 422,
    "overloaded": 503,
    "stopping": 503,
    "cancelled": 499,  # the client went away (nginx's code): never read by anyone, logged only
    "error": 500,
}


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"kind": kind, "message": message, "type": kind}}


def error_response(kind: str, message: str, *, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(kind, message), status_code=STATUS_BY_KIND.get(kind, 500), headers=headers)
