"""A tiny Hugging Face Hub stand-in on 127.0.0.1 for download tests.

It answers what ``huggingface_hub.hf_hub_download`` asks when ``HF_ENDPOINT`` points at it:
``HEAD`` and ``GET /{repo_id}/resolve/{revision}/{filename}`` with the headers the client needs
(``X-Repo-Commit``, ``ETag``, ``Content-Length``), content served directly (no redirect), and
``Range: bytes=N-`` answered with ``206 Partial Content`` so cut downloads can resume. Errors carry
the Hub's ``X-Error-Code`` so the client raises its usual exceptions. Like the Hub for LFS
files, the ETag is the SHA-256 of the content.

Every request is logged (method, path, headers) so tests can check what the client sent, and the
first GET of chosen files can be cut mid-stream to simulate a dropped connection.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
RANGE_RE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


@dataclass
class LoggedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


@dataclass
class Repo:
    commit: str  # 40 hex digits; also what "main" resolves to
    files: dict[str, bytes] = field(default_factory=dict)


class HubServer:
    """Start with ``with HubServer() as hub:``; ``hub.endpoint`` is the value for HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[LoggedRequest] = []
        # File names whose next GET sends only this fraction of the body, then drops the connection.
        self.cut_next_get: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_file(self, repo_id: str, commit: str, filename: str, content: bytes) -> None:
        repo = self.repos.setdefault(repo_id, Repo(commit=commit))
        repo.files[filename] = content

    def gets(self, filename: str) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + filename)]

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ----------------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet; requests are in hub.requests

            def do_HEAD(self) -> None:
                self._serve(send_body=False)

            def do_GET(self) -> None:
                self._serve(send_body=True)

            def _serve(self, *, send_body: bool) -> None:
                path = urlsplit(self.path).path
                with hub._lock:
                    headers = {key.lower(): value for key, value in self.headers.items()}
                    hub.requests.append(LoggedRequest(self.command, path, headers))
                match = RESOLVE_RE.match(path)
                if match is None:
                    return self._error(404, "EntryNotFound", None)
                repo = hub.repos.get(unquote(match["repo"]))
                if repo is None:
                    return self._error(404, "RepoNotFound", None)
                revision = unquote(match["revision"])
                if revision not in ("main", repo.commit):
                    return self._error(404, "RevisionNotFound", None)
                filename = unquote(match["filename"])
                content = repo.files.get(filename)
                if content is None:
                    return self._error(404, "EntryNotFound", repo.commit)
                self._send_content(repo.commit, filename, content, send_body)

            def _send_content(self, commit: str, filename: str, content: bytes, send_body: bool) -> None:
                total = len(content)
                start = 0
                range_header = self.headers.get("Range")
                range_match = RANGE_RE.match(range_header) if range_header else None
                if range_match:
                    start = int(range_match["start"])
                    end = int(range_match["end"]) if range_match["end"] else total - 1
                    body = content[start : end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{total}")
                else:
                    body = content
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("X-Repo-Commit", commit)
                self.end_headers()
                if not send_body:
                    return
                with hub._lock:
                    fraction = hub.cut_next_get.pop(filename, None)
                if fraction is None:
                    self.wfile.write(body)
                    return
                # Simulate a dropped connection: part of the promised body, then the socket closes.
                self.wfile.write(body[: int(len(body) * fraction)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def _error(self, status: int, code: str, commit: str | None) -> None:
                body = f'{{"error": "{code}"}}'.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Error-Code", code)
                if commit is not None:
                    self.send_header("X-Repo-Commit", commit)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        return Handler
