"""Parsing and rendering untrusted documents in a child process, with a timeout.

A PDF from the wild can crash or hang the PDF library. ``fila batch`` therefore opens, chooses
pages and renders in a worker process: a crash or a hang costs that one document (recorded as
``crash`` or ``timeout``) and a fresh worker takes the next one. The worker lives across
documents, so its start-up is paid once, not per file. Pages travel one at a time, so memory stays
bounded by one page.

The worker imports only the ``documents`` layer (PyMuPDF, Pillow, numpy), never torch, timm,
transformers or llama.cpp: a respawn after a crash or a timeout costs a PDF library's start-up,
not a model stack's.

``--timeout`` bounds the untrusted work alone: the time the worker spends on one document's
requests (opening, choosing pages, rendering, text extraction) adds up against it, while the model
encodes and answers between renders does not. A document is opened once for all its questions
(``open_for``), so its budget is one for all of them, and a document that crashes the worker
crashes one.

A worker whose parent is gone (killed with ``kill -9``, by the OOM killer) exits quietly when it
next talks to it: at once when idle (its ``recv`` meets the closed pipe), or when the request in
hand is done.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection
from pathlib import Path

from PIL import Image

from fila_cli.config import AnyresConfig
from fila_cli.documents.evidence import LocatablePage
from fila_cli.documents.notices import ReadNotices
from fila_cli.documents.page_select import METHOD_ALL, plan_pages
from fila_cli.documents.render import RenderedPage
from fila_cli.errors import FilaError, error_from_kind

# Spawned, not forked: the parent holds llama.cpp and torch state that must not be duplicated.
_CONTEXT = multiprocessing.get_context("spawn")
_JOIN_TIMEOUT_S = 5.0
# A fresh worker imports PyMuPDF and Pillow before it says it is ready (well under a second on an
# idle machine); the generous bound only catches a worker that cannot start at all.
STARTUP_TIMEOUT_S = 120.0
# Address space a document may add to the worker (on top of what its imports already mapped):
# far more than any capped page render needs, far less than a decompression bomb asks for.
DEFAULT_MEMORY_BUDGET_BYTES = 4 * 1024**3
_KIB = 1024


class WorkerFailure(FilaError):
    """The worker crashed or timed out on a document; ``kind`` is "crash" or "timeout"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class DocumentPlan:
    page_indices: list[int]
    reason: str
    method: str = METHOD_ALL  # page_select.METHOD_*
    page_count: int | None = None  # the document's pages (what `fila serve`'s chat sessions move between)


def _address_space_in_use() -> int | None:
    """Bytes of address space this process maps now (Linux), else None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * _KIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def limit_memory(budget_bytes: int | None) -> None:
    """Cap the process's address space at what it maps now plus ``budget_bytes`` (Linux; no-op elsewhere).

    Past the cap an allocation fails (MemoryError, or the PDF library's own error) instead of the
    machine swapping: the worker reports it and the batch goes on.
    """
    in_use = _address_space_in_use()
    if budget_bytes is None or in_use is None or not sys.platform.startswith("linux"):
        return
    import resource

    limit = in_use + budget_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _serve(connection: Connection, memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET_BYTES) -> None:
    """Child: answer requests until told to stop. Runs only what touches the untrusted file."""
    from fila_cli.documents import document, render  # noqa: F401  (imported before the memory cap)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    limit_memory(memory_budget_bytes)  # after the imports: the budget is the document's alone
    try:
        connection.send(("ready",))  # start-up is not the document's time
        _answer_requests(connection, memory_budget_bytes)
    except (EOFError, OSError):  # the parent is gone (killed): nobody to answer, nothing to say
        return


def _answer_requests(connection: Connection, memory_budget_bytes: int | None) -> None:
    from fila_cli.documents.document import open_document
    from fila_cli.documents.evidence import locatable_page
    from fila_cli.documents.notices import document_notices, page_notices
    from fila_cli.documents.render import render_for_canvas

    document = None
    path = ""
    # The open document's pages read for locating answers, by (index, ocr, canvases): a document's
    # several questions reopen it, and OCR costs seconds a page.
    locatable: dict[tuple[int, bool, str], dict] = {}
    while True:
        request = connection.recv()
        try:
            if request[0] == "open":
                _, opened, password, questions, pages = request
                if opened != path:
                    locatable.clear()
                path = opened
                if document is not None:
                    document.close()
                    document = None
                document = open_document(path, password=password)
                plans = [plan_pages(document, question, pages) for question in questions]
                connection.send(("ok", [(plan.indices, plan.detail, plan.method) for plan in plans], document.page_count))
            elif request[0] == "render":
                _, index, anyres, highres_scale, text_layer = request
                started = time.perf_counter()
                image = render_for_canvas(document, index, anyres, highres_scale)
                text = document.page_text(index) if text_layer else ""
                notices = page_notices(document, index).to_json()
                connection.send(("ok", index, image.size, image.tobytes(), text, time.perf_counter() - started, notices))
            elif request[0] == "locatable":
                _, indices, anyres, ocr = request
                keys = [(index, ocr, repr(anyres)) for index in indices]
                for key in keys:
                    if key not in locatable:
                        locatable[key] = locatable_page(document, key[0], anyres, ocr=ocr).to_json()
                connection.send(("ok", [locatable[key] for key in keys]))
            elif request[0] == "text":
                connection.send(("ok", document.page_text(request[1])))
            elif request[0] == "notices":
                connection.send(("ok", document_notices(document).to_json()))
            elif request[0] == "modules":
                connection.send(("ok", sorted(sys.modules)))
            else:  # "stop"
                return
        except FilaError as error:
            connection.send(("error", error.kind, str(error)))
        except MemoryError:
            budget = "its memory" if memory_budget_bytes is None else f"{memory_budget_bytes / 1024**2:,.0f} MiB"
            connection.send(("error", "crash", f"{path}: needed more than {budget} to open or render; the file is "
                                               f"damaged or hostile (a decompression bomb?)"))
        except Exception as error:  # the untrusted file reached a library bug: report it, never a traceback
            connection.send(("error", "error", f"{path}: the PDF/image library failed on it "
                                               f"({type(error).__name__}: {error}); the file may be damaged"))


class DocumentWorker:
    """The parent's handle on the worker process.

    ``timeout_s`` is each document's budget of worker time: every request for the document
    (open, render, text) spends from it only while the worker is busy with that request.
    """

    def __init__(self, timeout_s: float, memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET_BYTES):
        self.timeout_s = timeout_s
        self.memory_budget_bytes = memory_budget_bytes
        self._busy_s = 0.0  # worker time spent on the current document
        self._process: multiprocessing.process.BaseProcess | None = None
        self._connection: Connection | None = None

    def _ensure_started(self, file: Path) -> Connection:
        if self._process is None or not self._process.is_alive():
            parent_end, child_end = _CONTEXT.Pipe()
            self._process = _CONTEXT.Process(target=_serve, args=(child_end, self.memory_budget_bytes), daemon=True, name="fila-document-worker")
            self._process.start()
            child_end.close()
            self._connection = parent_end
            self._wait_ready(file)
        assert self._connection is not None
        return self._connection

    def _wait_ready(self, file: Path) -> None:
        assert self._connection is not None
        try:
            ready = self._connection.poll(STARTUP_TIMEOUT_S) and self._connection.recv() == ("ready",)
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._kill()
            raise WorkerFailure("crash", f"{file}: the document worker did not start within {STARTUP_TIMEOUT_S:g} s; "
                                         f"check that PyMuPDF imports (python -c 'import pymupdf')")

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(_JOIN_TIMEOUT_S)
        self._process, self._connection = None, None

    def _call(self, file: Path, request: tuple) -> tuple:
        """Send one request and wait for its reply, spending the document's budget while waiting."""
        connection = self._ensure_started(file)
        started = time.monotonic()
        connection.send(request)
        remaining = max(0.0, self.timeout_s - self._busy_s)
        try:
            ready = connection.poll(remaining)
            reply = connection.recv() if ready else None
        except (EOFError, OSError):
            ready, reply = True, None
        finally:
            self._busy_s += time.monotonic() - started
        if not ready:
            self._kill()
            raise WorkerFailure("timeout", f"{file}: gave up after {self.timeout_s:g} s of opening and rendering "
                                           f"(--timeout); the file may be malformed")
        if reply is None:
            exit_code = self._process.exitcode if self._process is not None else None
            self._kill()
            raise WorkerFailure("crash", f"{file}: the PDF/image library crashed on it (exit {exit_code}); the file is damaged or hostile")
        if reply[0] == "error":
            _, kind, message = reply
            if kind == "crash":
                self._kill()  # a worker that ran out of memory starts the next document afresh
                raise WorkerFailure(kind, message)
            raise error_from_kind(kind, message)  # usage, document, ... as the worker raised it
        return reply

    def open(self, file: Path, question: str, pages: str | None, password: str | None) -> DocumentPlan:
        """``open_for`` one question."""
        return self.open_for(file, [question], pages, password)[0]

    def open_for(self, file: Path, questions: list[str], pages: str | None, password: str | None) -> list[DocumentPlan]:
        """Open the document in the worker and choose its pages for each question; the document's
        time budget starts afresh, one budget for all its questions."""
        self._busy_s = 0.0
        _, plans, page_count = self._call(file, ("open", str(file), password, list(questions), pages))
        return [DocumentPlan(indices, reason, method, page_count) for indices, reason, method in plans]

    def render(self, file: Path, index: int, anyres: AnyresConfig, text_layer: bool,
               highres_scale: Fraction | None = None) -> RenderedPage:
        """Render one planned page (memory: one page), from the document's time budget; with
        ``highres_scale`` (fusion on) at the ConvNeXt's high-resolution zoom."""
        request = ("render", index, anyres, highres_scale, text_layer)
        _, index, size, pixels, text, render_s, notices = self._call(file, request)
        return RenderedPage(index, Image.frombytes("RGB", size, pixels), text, render_s, ReadNotices.from_json(notices))

    def locatable_pages(self, file: Path, indices: list[int], anyres: AnyresConfig, ocr: bool) -> list[LocatablePage]:
        """The open document's pages ``indices`` (0-based) read for locating answers (their words and
        geometry; OCR'd when ``ocr`` and they have no text layer), from the document's time budget."""
        return [LocatablePage.from_json(page) for page in self._call(file, ("locatable", indices, anyres, ocr))[1]]

    def text(self, file: Path, index: int) -> str:
        return self._call(file, ("text", index))[1]

    def loaded_modules(self) -> list[str]:
        """The worker's ``sys.modules`` (what a respawn pays to import), starting it if needed."""
        return self._call(Path("<worker>"), ("modules",))[1]

    def notices(self, file: Path) -> ReadNotices:
        """What MuPDF said about the open document in this worker (ask after its pages were rendered)."""
        return ReadNotices.from_json(self._call(file, ("notices",))[1])

    def close(self) -> None:
        if self._process is not None and self._process.is_alive() and self._connection is not None:
            try:
                self._connection.send(("stop",))
                self._process.join(_JOIN_TIMEOUT_S)
            except (OSError, EOFError):
                pass
        self._kill()
