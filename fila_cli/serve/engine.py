"""The server's one door into the question-answering library: load, plan, prepare, answer, chat.

Every use of ``fila_cli.qa``'s model code by the server goes through this module, so a change of
that API is met here alone. (The ``--server`` client reads records with ``qa.records`` alone: it
loads no model code.)

A question about an uploaded document runs in three steps, as ``fila batch`` runs a unit:

1. ``plan``: open the upload in the isolated document worker and choose its pages there;
2. ``prepare``: render each page in the worker and encode it here (token cache first);
3. ``answer``: the LLM answers from the prepared pages (prefix states reused, as ``fila ask`` does).

The first two run in the server's preparing thread, the third in its LLM thread, so the next
request's pages are rendered and encoded while the LLM answers the current one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fila_cli.documents.document import file_sha256
from fila_cli.documents.evidence import Evidence, LocatablePage
from fila_cli.documents.notices import ReadNotices, warning_lines
from fila_cli.errors import FilaError
from fila_cli.llm.sampling import SamplingParams
from fila_cli.qa.answer_evidence import locate_on_pages, locating_failed
from fila_cli.qa.ask import Asker, OnePromptQuestion
from fila_cli.qa.chat import ChatSession, Turn
from fila_cli.qa.isolation import DocumentPlan, DocumentWorker, WorkerFailure
from fila_cli.qa.model import Model
from fila_cli.qa.options import AskOptions, ModelOptions
from fila_cli.qa.pages import PageSource, PreparedPage
from fila_cli.qa.records import Answer, failed_record
from fila_cli.qa.timings import Timings
from fila_cli.vision.model.encoder import HybridEncoder

TextCallback = Callable[[str], None]
PageProgress = Callable[[int, int], None]

__all__ = ["AskOptions", "DocumentWorker", "Engine", "ModelOptions", "Planned", "WorkerFailure", "ask_options", "turn_from_record"]


def ask_options(*, pages: str | None = None, password: str | None = None, text_layer: bool = False,
                together: bool = False, temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None, max_tokens: int | None = None) -> AskOptions:
    """The library's options for one question (None: the library's default); a bad ``pages`` is a UsageError."""
    defaults = SamplingParams()
    sampling = SamplingParams(
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        seed=defaults.seed if seed is None else seed,
        max_tokens=defaults.max_tokens if max_tokens is None else max_tokens)
    return AskOptions(pages=pages, password=password, text_layer=text_layer, together=together, sampling=sampling)


@dataclass
class Planned:
    """An upload opened in the worker: which pages to read and why."""

    file: Path  # where the upload lies on the server
    name: str  # the file as the client named it: what the record and its messages say
    question: str
    plan: DocumentPlan
    sha256: str | None  # None with the caches off
    timings: Timings = dataclasses.field(default_factory=Timings)
    # The planned pages' words and geometry, read in the worker with the last page, for the evidence
    # (``fila batch`` does the same); or why they could not be read.
    locatable: list[LocatablePage] = dataclasses.field(default_factory=list)
    locating_error: Exception | None = None

    @property
    def n_pages(self) -> int:
        return len(self.plan.page_indices)


# A prepared page, and what the worker heard about the document (with the last page, else None).
PreparedItem = tuple[PreparedPage, ReadNotices | None]


class Engine:
    """One loaded model (the library's front door, ``Model``) and what the server does with it."""

    def __init__(self, model: Model, *, timeout_s: float):
        self.model = model
        self.asker = model.asker
        self.timeout_s = timeout_s

    @classmethod
    def load(cls, options: ModelOptions, *, timeout_s: float, parallel: int = 1,
             load_asker: Callable[..., Asker] = Asker.from_options) -> Engine:
        """Load the model ``options`` name, able to answer ``parallel`` questions side by side. The
        prefix of the last page stays in memory, so a second question on the page decodes only its
        own words. ``load_asker``: ``Asker.from_options``, or the CLI's (which says what it loaded)."""
        asker = load_asker(options, reuse_prefix=True, n_seq_max=parallel)
        return cls(Model(asker, options), timeout_s=timeout_s)

    def close(self) -> None:
        """Free the LLM (after the server's threads have stopped)."""
        self.model.close()

    @property
    def parallel(self) -> int:
        return self.asker.backend.n_seq_max

    @property
    def model_name(self) -> str:
        return self.model.name

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about the model."""
        encoder, backend = self.asker.encoder, self.asker.backend
        return {"id": self.model_name, "object": "model", "owned_by": "fila", "n_ctx": backend.n_ctx,
                "vision_device": encoder.device.type, "vision_dtype": str(encoder.dtype).removeprefix("torch."),
                "caches": self.asker.caches_on}

    def failed_record(self, name: str, question: str, kind: str, message: str) -> dict[str, Any]:
        """The ``fila ask --json`` record of a question about ``name`` that got no answer."""
        return failed_record(name, question, self.model_name, kind, message)

    def new_worker(self) -> DocumentWorker:
        return DocumentWorker(self.timeout_s)

    # -- a question about an upload --

    def plan(self, worker: DocumentWorker, file: Path, name: str, question: str, options: AskOptions) -> Planned:
        """Open ``file`` in the worker and choose its pages (the document's time budget starts here)."""
        plan = worker.open(file, question, options.pages, options.password)
        sha256 = file_sha256(file) if self.asker.caches_on else None
        return Planned(file, name, question, plan, sha256)

    def prepare(self, worker: DocumentWorker, planned: Planned, options: AskOptions) -> Iterator[PreparedItem]:
        """The planned pages rendered in the worker and encoded here, one at a time; the last one
        comes with what the worker heard reading the document."""
        file = planned.file
        sources = [worker_page(worker, file, index, self.asker.encoder, options.text_layer)
                   for index in planned.plan.page_indices]
        pages = self.asker.prepare_pages(planned.name, sources, planned.sha256, planned.timings, options.text_layer)
        for position, page in enumerate(pages):
            last = position == len(sources) - 1
            if last:
                self._read_locatable(worker, planned, options)
            yield page, worker.notices(file) if last else None

    def _read_locatable(self, worker: DocumentWorker, planned: Planned, options: AskOptions) -> None:
        try:
            planned.locatable = worker.locatable_pages(planned.file, planned.plan.page_indices, self.asker.encoder.anyres,
                                                       options.evidence_ocr)
        except Exception as error:  # the answer stands without its evidence, which says why
            planned.locating_error = error

    @staticmethod
    def _record(planned: Planned, answer: Answer, heard: ReadNotices, options: AskOptions) -> dict[str, Any]:
        """The answer's record as ``fila ask`` writes it: warnings and evidence included."""
        answer.warnings = warning_lines(planned.name, heard.merged(answer.notices))
        if planned.locating_error is not None:
            answer.evidence = locating_failed(planned.locating_error)
        else:
            answer.evidence = locate_on_pages([page for page in planned.locatable if page.index + 1 in answer.pages],
                                              answer.answer, ocr=options.evidence_ocr)
        return answer.to_json()

    def answer(self, planned: Planned, items: Iterable[PreparedItem], options: AskOptions,
               on_text: TextCallback | None = None, on_page: PageProgress | None = None) -> dict[str, Any]:
        """The ``fila ask --json`` record for ``planned``, from its prepared pages as they come."""
        heard = ReadNotices()

        def pages() -> Iterator[PreparedPage]:
            nonlocal heard
            for page, notices in items:
                if notices is not None:
                    heard = notices
                yield page

        answer = self.asker.answer_prepared(planned.name, planned.question, pages(), planned.n_pages, planned.plan.reason,
                                            options, planned.timings, on_text, on_page, method=planned.plan.method)
        return self._record(planned, answer, heard, options)

    def one_prompt(self, planned: Planned, options: AskOptions) -> bool:
        """Whether one prompt answers ``planned`` (one page, or --together): what may share a step."""
        return planned.n_pages == 1 or options.together

    def answer_side_by_side(self, group: list[tuple[Planned, list[PreparedItem]]],
                            options: AskOptions) -> list[dict[str, Any] | BaseException]:
        """Records for questions of one prompt each, answered side by side in one LLM context
        (``fila batch --parallel``'s ``Asker.answer_many``: the same greedy answers); a question whose
        prompt does not fit is answered alone, which says why."""
        asked, heard = [], []
        for planned, items in group:
            pages = [page for page, _ in items]
            notices = [n for _, n in items if n is not None]
            heard.append(notices[-1] if notices else ReadNotices())
            asked.append(OnePromptQuestion(planned.name, planned.question, pages, planned.plan.reason,
                                           planned.plan.method, planned.timings))
        fits = [self.asker.fits_one_prompt(question, options) for question in asked]
        together = [question for question, fit in zip(asked, fits) if fit]
        answers = iter(self.asker.answer_many(together, options) if together else [])
        records: list[dict[str, Any] | BaseException] = []
        for (planned, items), notices, fit in zip(group, heard, fits):
            if not fit:
                try:
                    records.append(self.answer(planned, items, options))
                except Exception as error:
                    records.append(error)
                continue
            records.append(self._record(planned, next(answers), notices, options))
        return records

    # -- chat sessions --

    def chat(self, worker: DocumentWorker, file: Path, name: str, options: AskOptions,
             on_notice: Callable[[str], None] | None = None) -> ServedChat:
        """A conversation about an upload, its pages rendered in ``worker`` (which it then owns)."""
        return ServedChat(self.asker, worker, file, name, options, on_notice=on_notice)


def worker_page(worker: DocumentWorker, file: Path, index: int, encoder: HybridEncoder, text_layer: bool) -> PageSource:
    """Page ``index`` of ``file``, rendered in the isolated ``worker`` for ``encoder``'s canvas."""
    return PageSource(index, render=partial(worker.render, file, index, encoder.anyres, text_layer, encoder.highres_scale),
                      text=partial(worker.text, file, index))


class _UploadedDocument:
    """What ``ChatSession`` reads of its document, for an upload open in the isolated worker:
    its name, page count and hash, and what MuPDF said reading it (asked of the worker)."""

    def __init__(self, worker: DocumentWorker, file: Path, name: str, page_count: int):
        self.worker = worker
        self.file = file
        self.path = name
        self.page_count = page_count
        self._heard = ReadNotices()

    def content_hash(self) -> str:
        return file_sha256(self.file)

    def _notices(self) -> ReadNotices:
        """What the worker heard so far; after the worker failed (the upload is no longer open
        there), what it said last."""
        try:
            self._heard = self.worker.notices(self.file)
        except FilaError:  # WorkerFailure included
            pass
        return self._heard

    @property
    def repaired(self) -> bool:
        return self._notices().repaired

    @property
    def warnings(self) -> list[str]:
        return list(self._notices().complaints)


class ServedChat:
    """A ``ChatSession`` about an upload, its pages rendered in the session's own isolated worker.

    The LLM's context is shared by every request: a turn first restores this session's pages and
    kept turns when another request used the LLM since its last turn (``ChatSession.recover``:
    text only, the page state is kept in memory), then decodes only its own words.
    """

    def __init__(self, asker: Asker, worker: DocumentWorker, file: Path, name: str, options: AskOptions, *,
                 on_notice: Callable[[str], None] | None = None):
        self.worker = worker
        self.upload = file  # where it lies on the server; ``file``: as the client named it
        self.file = name
        self._options = options
        self._encoder = asker.encoder
        plan = worker.open(file, "", options.pages or "1", options.password)  # opened there; the pages checked
        document = _UploadedDocument(worker, file, name, plan.page_count)
        self.session = ChatSession(asker, document, options, on_notice=on_notice,  # type: ignore[arg-type]
                                   page_source=self._source)

    def _source(self, index: int) -> PageSource:
        return worker_page(self.worker, self.upload, index, self._encoder, self._options.text_layer)

    def restore(self) -> None:
        """Back to this session's pages and kept turns in the LLM's context."""
        self.session.recover()

    def turn(self, question: str, on_text: TextCallback | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Answer a follow-up; the ``fila chat --json`` line (``ChatSession.record``)."""
        turn = self.session.ask(question, on_text=on_text, should_stop=should_stop)
        turn.evidence = self._evidence(turn.pages, turn.answer)  # the upload's words are in the worker
        return self.session.record(turn)

    def _evidence(self, pages: list[int], answer: str) -> Evidence:
        """Where ``answer`` is on the 1-based ``pages``, from the words the worker reads of the upload."""
        ocr = self._options.evidence_ocr
        try:
            read = self.worker.locatable_pages(self.upload, [page - 1 for page in pages], self._encoder.anyres, ocr)
        except Exception as error:  # the answer stands without its evidence, which says why
            return locating_failed(error)
        return locate_on_pages(read, answer, ocr=ocr)

    def go_to_page(self, number: int) -> None:
        self.session.go_to_page(number)

    def add_page(self, number: int) -> None:
        self.session.add_page(number)

    def clear(self) -> None:
        self.session.clear()

    def transcript(self) -> dict[str, Any]:
        return self.session.transcript()

    def state(self) -> dict[str, Any]:
        session = self.session
        return {"file": self.file, "model": session.asker.model_name, "pages": session.page_numbers,
                "page_count": session.document.page_count, "visual_tokens": session.n_visual,
                "context_used": session.context_used, "n_ctx": session.backend.n_ctx, "turns": len(session.history),
                "turns_in_context": session.turns_in_context, "warnings": session.warnings,
                "page_choice": {"method": session.page_method, "detail": session.page_detail}}

    def close(self) -> None:
        self.session.close()
        self.worker.close()


def turn_from_record(record: dict[str, Any]) -> Turn:
    """The ``Turn`` a ``fila chat --json`` line was made from (its token ids are the server's)."""
    return Turn(question=record["question"], answer=record["answer"], pages=list(record["pages"]), answer_ids=[],
                confidence=record["confidence"], interrupted=record["interrupted"],
                timings=Timings(**record["timings"]), tokens=dict(record["tokens"]),
                dropped_turns=record.get("dropped_turns") or 0)
