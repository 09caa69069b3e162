"""What ``fila serve`` is started with, and the defaults the command's help shows."""

from __future__ import annotations

from dataclasses import dataclass

from fila_cli.errors import UsageError

DEFAULT_PORT = 8470
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_UPLOAD_MB = 100.0
DEFAULT_TIMEOUT_S = 120.0  # the document worker's time per document, as fila batch --timeout
DEFAULT_MAX_SESSIONS = 4
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


@dataclass
class ServeSettings:
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for the LLM; past it 503 + Retry-After
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB  # past it 413
    timeout_s: float = DEFAULT_TIMEOUT_S  # the document worker's time per document
    api_key: str | None = None  # Authorization: Bearer KEY on every /v1 request
    allow_fetch: bool = False  # OpenAI image_url parts may be http(s) URLs the server downloads
    max_sessions: int = DEFAULT_MAX_SESSIONS  # chat sessions held at once (each keeps its page state in memory)
    idle_exit_s: float | None = None  # exit after this long without a request (--keep-alive's servers)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024**2)

    def check(self) -> None:
        if self.max_queue < 1:
            raise UsageError(f"--max-queue must be at least 1 (got {self.max_queue})")
        if not self.max_upload_mb > 0:
            raise UsageError(f"--max-upload-mb must be positive (got {self.max_upload_mb:g})")
        if not self.timeout_s > 0:
            raise UsageError(f"--timeout must be positive (got {self.timeout_s:g})")
        if self.max_sessions < 0:
            raise UsageError(f"--max-sessions must be 0 or more (got {self.max_sessions})")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty")
