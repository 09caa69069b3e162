"""``POST /v1/chat/completions``: fila as a local vision model for any OpenAI client.

    client = openai.OpenAI(base_url="http://127.0.0.1:8470/v1", api_key="unused")
    client.chat.completions.create(model="fila", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is the total due?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])

How a request maps onto ``fila ask``:

- The document is the last ``image_url`` part of the conversation: a data URL of an image
  (``image/png``, ``image/jpeg``, ``image/webp``, ``image/tiff``) or of a PDF
  (``application/pdf``). ``http(s)`` URLs are refused unless the server runs with
  ``--allow-fetch`` (the server would otherwise fetch whatever a client names).
- The question is the text of the last user message. Earlier turns and system messages are not
  given to the model (fila's prompt is the model's own template around one question); for a
  conversation use the native chat sessions (``/v1/chat/sessions``).
- A PDF's pages are chosen as ``fila ask`` chooses them: the pages whose text layer matches the
  question best (BM25), else every page (up to ten) with the most confident answer kept; the
  request may name them with ``"pages": "2"`` (an extra body field). The response's ``fila``
  field holds the ``fila ask --json`` record: which pages were read, and why.
- ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p`` and ``seed`` map to
  fila's sampling options; ``stream`` streams deltas as server-sent events, with ``usage`` in a last
  chunk when ``stream_options.include_usage`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import shutil
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from fila_cli.errors import UsageError
from fila_cli.serve.engine import ask_options
from fila_cli.serve.http_errors import error_body, error_response
from fila_cli.serve.limits import TooLarge
from fila_cli.serve.responses import next_final, renamed
from fila_cli.serve.scheduler import AskWork, Job

# What a data URL's media type says the file is (the name the record gives it).
SUFFIX_BY_MEDIA_TYPE = {"application/pdf": ".pdf", "image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg",
                        "image/webp": ".webp", "image/tiff": ".tiff"}
FETCH_TIMEOUT_S = 30.0


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    return ""


def _image_urls(content: Any) -> list[str]:
    if not isinstance(content, list):
        return []
    urls = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise UsageError("an image_url part needs a url: a data URL (data:image/png;base64,...)")
            urls.append(url)
    return urls


def question_and_document(messages: Any) -> tuple[str, str]:
    """(the last user message's text, the last image_url of the conversation); UsageError otherwise."""
    if not isinstance(messages, list) or not messages:
        raise UsageError("messages must be a non-empty list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise UsageError("no user message: the question is the last user message's text")
    question = _text_of(users[-1].get("content")).strip()
    if not question:
        raise UsageError("the last user message has no text: fila needs a question about the document")
    urls = [url for m in messages if isinstance(m, dict) for url in _image_urls(m.get("content"))]
    if not urls:
        raise UsageError("no image_url part: send the page (or a PDF) as a data URL, e.g. data:image/png;base64,...")
    return question, urls[-1]


def decode_data_url(url: str) -> tuple[bytes, str]:
    """(bytes, file suffix) of a base64 data URL."""
    header, comma, data = url.partition(",")
    if not comma or not header.startswith("data:") or ";base64" not in header:
        raise UsageError("an image_url must be a base64 data URL (data:image/png;base64,...)")
    media_type = header[len("data:"):].split(";")[0].strip().lower()
    suffix = SUFFIX_BY_MEDIA_TYPE.get(media_type)
    if suffix is None:
        known = ", ".join(sorted(SUFFIX_BY_MEDIA_TYPE))
        raise UsageError(f"a data URL of {media_type or 'no media type'}: fila reads {known}")
    try:
        return base64.b64decode(data, validate=True), suffix
    except (binascii.Error, ValueError):
        raise UsageError("the data URL's base64 is malformed") from None


def fetch(url: str, max_bytes: int) -> tuple[bytes, str]:
    """Download an http(s) URL (``--allow-fetch``), at most ``max_bytes``."""
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
            media_type = response.headers.get_content_type()
    except OSError as error:
        raise UsageError(f"{url}: cannot fetch it ({error})") from None
    if len(data) > max_bytes:
        raise TooLarge
    suffix = SUFFIX_BY_MEDIA_TYPE.get(media_type, Path(urllib.parse.urlparse(url).path).suffix.lower())
    return data, suffix


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    values = {"temperature": body.get("temperature"), "top_p": body.get("top_p"), "seed": body.get("seed"),
              "max_tokens": max_tokens}
    for name, value in values.items():
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise UsageError(f"{name} must be a number")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError("max_tokens must be at least 1")
    return values


def usage_of(record: dict[str, Any]) -> dict[str, int]:
    tokens = record["tokens"]
    return {"prompt_tokens": tokens["prompt"], "completion_tokens": tokens["generated"],
            "total_tokens": tokens["prompt"] + tokens["generated"]}


def finish_reason(record: dict[str, Any], max_tokens: int) -> str:
    return "length" if record["tokens"]["generated"] >= max_tokens else "stop"


def register_openai(app: FastAPI, server, authorized: list) -> None:
    settings = server.settings

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request):
        """OpenAI's chat completions, for a question about the document in an image_url part."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response("usage", "the body must be a JSON object (OpenAI's chat completions request)")
        if not isinstance(body, dict):
            return error_response("usage", "the body must be a JSON object (OpenAI's chat completions request)")
        question, url = question_and_document(body.get("messages"))
        sampling = _sampling(body)
        scheme = urllib.parse.urlparse(url).scheme.lower()
        if scheme == "data":
            data, suffix = decode_data_url(url)
            name = f"image_url{suffix}"
        elif scheme in ("http", "https"):
            if not settings.allow_fetch:
                raise UsageError("http(s) image URLs are not fetched: send the file as a data URL, or start the "
                                 "server with --allow-fetch")
            data, suffix = await asyncio.to_thread(fetch, url, settings.max_upload_bytes)
            name = url
        else:
            raise UsageError(f"an image_url of scheme {scheme or '(none)'}: send a data URL")
        options = ask_options(pages=body.get("pages"), password=body.get("password"),
                              text_layer=bool(body.get("text_layer", False)), together=bool(body.get("together", False)),
                              **sampling)
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        directory = server.new_upload_dir()
        handed_over = False
        try:
            path = server.write_upload(data, name if scheme == "data" else f"document{suffix}", directory)
            job = Job(asyncio.get_running_loop())
            server.scheduler.submit_ask(job, AskWork(path, name, question, options, stream))
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            model = server.engine.model_name
            if not stream:
                kind, value = await next_final(job, request)
                if kind == "error":
                    return error_response(*renamed(value, path, name))
                return JSONResponse({
                    "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": value["answer"]},
                                 "finish_reason": finish_reason(value, options.sampling.max_tokens), "logprobs": None}],
                    "usage": usage_of(value), "fila": value})
            first = await job.events.get()
            if first[0] == "error":
                return error_response(*renamed(first[1], path, name))
            handed_over = True
            chunks = _chunks(job, first, path, name, directory, completion_id=completion_id, created=created,
                             model=model, max_tokens=options.sampling.max_tokens, include_usage=include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        finally:
            if not handed_over:
                if "job" in locals():
                    job.cancel()
                shutil.rmtree(directory, ignore_errors=True)


def _sse(item: dict[str, Any] | str) -> bytes:
    return f"data: {item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)}\n\n".encode()


async def _chunks(job: Job, first: tuple[str, Any], path: Path, name: str, directory: Path, *, completion_id: str,
                  created: int, model: str, max_tokens: int, include_usage: bool):
    def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> bytes:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        streamed = False
        event = first
        while True:
            kind, value = event
            if kind == "delta":
                streamed = True
                yield chunk({"content": value})
            elif kind == "record":
                if not streamed:  # several pages: the best page's answer is known at the end
                    yield chunk({"content": value["answer"]})
                yield chunk({}, finish_reason(value, max_tokens), fila=value)
                if include_usage:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": [], "usage": usage_of(value)})
                break
            else:
                yield _sse(error_body(*renamed(value, path, name)))
                break
            event = await job.events.get()
        yield _sse("[DONE]")
    finally:
        job.cancel()
        shutil.rmtree(directory, ignore_errors=True)
