"""Request bodies past ``--max-upload-mb`` end in 413 before the server stores them.

A pure ASGI middleware: a declared ``Content-Length`` past the cap is refused before a byte is
read; a body without one (chunked) is counted as it arrives and refused once past the cap.
"""

from __future__ import annotations

import json
import math

from fila_cli.serve.http_errors import STATUS_BY_KIND, error_body

# A multipart body carries its form fields and boundaries beside the file; an OpenAI request
# carries the file base64-encoded (4 bytes per 3) inside JSON.
FORM_OVERHEAD_BYTES = 64 * 1024
BASE64_GROWTH = 4 / 3


def body_cap(max_upload_bytes: int, content_type: str) -> int:
    """The most body bytes a request may send for an upload of ``max_upload_bytes``."""
    if content_type.startswith("application/json"):
        return math.ceil(max_upload_bytes * BASE64_GROWTH) + FORM_OVERHEAD_BYTES
    return max_upload_bytes + FORM_OVERHEAD_BYTES


def too_large_message(max_upload_bytes: int) -> str:
    return (f"the upload is larger than the server's limit of {max_upload_bytes / 1024**2:g} MB "
            f"(fila serve --max-upload-mb)")


class TooLarge(Exception):
    """An upload past the cap, found after its body was read (a data URL, a fetched file)."""


class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app, max_upload_bytes: int):
        self.app = app
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        cap = body_cap(self.max_upload_bytes, headers.get("content-type", ""))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            await self._refuse(send)
            return
        received = 0
        started = over = False

        async def counting_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    over = True
                    raise _TooLarge
            return message

        async def tracking_send(message):
            # A framework that caught _TooLarge while parsing answers with its own error: ours instead.
            nonlocal started
            if over:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body("too_large", too_large_message(self.max_upload_bytes))).encode()
        await send({"type": "http.response.start", "status": STATUS_BY_KIND["too_large"],
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
