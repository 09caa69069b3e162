"""``fila batch``: many documents, many questions, one JSON record each, nothing lost.

- One record per (document, question), flushed (and fsync'd to a file) as soon as it is answered:
  ``kill -9`` loses at most the record in flight.
- ``--resume`` skips the (document sha256, question, model) triples the output already holds, after
  cutting a torn last line left by a kill mid-write.
- Documents are opened and rendered in an isolated worker (``isolation.py``): a crash or hang is
  that document's error record, and the batch goes on.
- ``should_stop`` (the CLI sets it on Ctrl-C or SIGTERM) stops after the record in flight (with
  ``parallel``, the group's records in flight); the batch installs no signal handler.
- Stages overlap: ``prepare_units`` (open and render in the worker, encode here) runs in a thread
  (``pipeline.RunAhead``), ``--pipeline-depth`` pages ahead of ``answer_units`` (the LLM). Both sides
  walk the units in the same order and every unit ends in exactly one record, so the output is the
  one-stage-at-a-time batch's, record for record.
- ``parallel`` N: up to N consecutive units of one prompt each are answered side by side in one
  llama.cpp context (``answer_groups``, ``LlamaBackend.generate_many``), their records written in
  the units' order, the one-at-a-time batch's records (``generate_many`` says when a later answer
  token can differ).
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fila_cli.config import AnyresConfig
from fila_cli.documents.document import file_sha256
from fila_cli.documents.evidence import LocatablePage
from fila_cli.documents.notices import ReadNotices, warning_lines
from fila_cli.errors import DocumentError, FilaError, UsageError
from fila_cli.qa.answer_evidence import locate_on_pages, locating_failed, record_notice
from fila_cli.qa.ask import Answer, Asker, AskOptions, OnePromptQuestion, PageSource, PreparedPage
from fila_cli.qa.isolation import DocumentPlan, DocumentWorker, WorkerFailure
from fila_cli.qa.options import BatchOptions
from fila_cli.qa.pipeline import RunAhead
from fila_cli.qa.records import error_of, failed_record
from fila_cli.qa.run import BatchSummary, RecordSink, StopCheck, WarningReporter, never_stop, unit_key
from fila_cli.qa.timings import Timings

DOCUMENT_SUFFIXES = {".pdf", ".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"}
_GLOB_CHARACTERS = set("*?[")


def collect_documents(paths: list[str], recursive: bool) -> list[Path]:
    """Files as given, the documents of folders (descending with ``recursive``), and globs."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.iterdir()
            found.extend(sorted(p for p in walk if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES))
        elif not path.exists() and _GLOB_CHARACTERS & set(raw):
            found.extend(sorted(Path(p) for p in glob.glob(raw, recursive=recursive) if Path(p).is_file()))
        else:
            found.append(path)  # a missing file becomes its own error record
    unique: dict[Path, None] = dict.fromkeys(found)
    return list(unique)


# A line of a --questions file starting so is a comment, not a question.
COMMENT_PREFIX = "#"


def read_questions(questions: list[str], questions_file: Path | None) -> list[str]:
    """The questions of ``-q`` and of a questions file (one a line; blank lines and ``#`` comments
    skipped), each once, in order; none is a UsageError naming what the user gave."""
    all_questions = [q.strip() for q in questions if q.strip()]
    from_file: list[str] = []
    if questions_file is not None:
        try:
            lines = questions_file.read_text().split("\n")
        except OSError as error:
            raise UsageError(f"{questions_file}: cannot read the questions file ({error.strerror})") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.strip().startswith(COMMENT_PREFIX)]
    all_questions += from_file
    if not all_questions:
        if questions_file is not None:
            raise UsageError(f"{questions_file}: no question in it (blank lines and # comments are skipped); "
                             f"write one question a line")
        if questions:
            raise UsageError("-q: the question is empty; give its text, e.g. -q \"What is the total?\"")
        raise UsageError("no question: pass -q QUESTION (repeatable) or --questions FILE (one per line)")
    return list(dict.fromkeys(all_questions))


# -- the units of work, prepared (stages A and B) then answered (stage C) --


@dataclass
class Unit:
    """One record's work: a question about a document, with its page plan once the worker made it."""

    file: Path
    sha256: str | None
    question: str
    name: str | None = None  # the path as the user gave it, which warnings name (default: ``file``)
    plan: DocumentPlan | None = None
    timings: Timings = field(default_factory=Timings)  # render and encode times land here first
    # The planned pages' words and geometry, read in the worker with the last page (answer_evidence),
    # or why they could not be.
    locatable: list[LocatablePage] = field(default_factory=list)
    locating_error: Exception | None = None
    evidence_ocr: bool = False


@dataclass
class Skipped:
    """A unit ``--resume`` found done."""

    unit: Unit


@dataclass
class PageReady:
    """One planned page of ``unit``, rendered and encoded; the last one carries what the worker
    heard opening and rendering the document."""

    unit: Unit
    page: PreparedPage
    last: bool
    notices: ReadNotices = field(default_factory=ReadNotices)


@dataclass
class UnitFailed:
    """Preparing ``unit`` failed (before its first page or between two): its record is this error."""

    unit: Unit
    error: Exception


PreparedItem = Skipped | PageReady | UnitFailed


def prepare_units(asker: Asker, worker: DocumentWorker, documents: Iterable[tuple[Path, str | None, str | None]],
                  questions: list[str], options: AskOptions, done: set | None = None) -> Iterator[PreparedItem]:
    """Stages A and B, one item per page: each (document, question) not in ``done`` planned in the
    worker, its pages rendered there and encoded here, in the batch's order.

    A unit yields its pages (the last one marked), or ``UnitFailed`` in place of the rest once
    something fails; a unit ``done`` holds yields ``Skipped``. Every unit yields something, so
    ``answer_units`` writes exactly one record for each unit it is handed.
    """
    done = done or set()
    for file, sha256, name in documents:  # name: the path as the user gave it (None: ``file``)
        units = [Unit(file, sha256, question, name) for question in questions]
        skipped = [unit_key(file, sha256, question, asker.model_name) in done for question in questions]
        yield from _prepare_document(asker, worker, units, skipped, options)


def _prepare_document(asker: Asker, worker: DocumentWorker, units: list[Unit], skipped: list[bool],
                      options: AskOptions) -> Iterator[PreparedItem]:
    """One document's units: opened and planned once for all its questions (one ``--timeout``
    budget), each page rendered and encoded once however many questions read it (up to
    ``SHARED_PAGES_MAX`` held at a time), and a crash or a timeout the record of every question
    left, without a second worker or budget spent on it."""
    todo = [unit for unit, skip in zip(units, skipped) if not skip]
    failure: Exception | None = None
    if todo:
        try:
            if todo[0].sha256 is None:
                raise DocumentError(f"{todo[0].file}: no such file or not readable; check the path")
            plans = worker.open_for(todo[0].file, [unit.question for unit in todo], options.pages, options.password)
            for unit, plan in zip(todo, plans):
                unit.plan = plan
        except Exception as error:  # every question's record says it
            failure = error
    shared = _SharedPages([unit.plan.page_indices for unit in todo if unit.plan is not None])
    for unit, skip in zip(units, skipped):
        if skip:
            yield Skipped(unit)
        elif failure is not None:
            yield UnitFailed(unit, failure)
        else:
            for item in _prepare_unit(asker, worker, unit, options, shared):
                if isinstance(item, UnitFailed) and isinstance(item.error, WorkerFailure):
                    failure = item.error  # the document crashed or timed out: not again for the next question
                yield item


# Pages of one document held for its later questions (visual tokens, float32): a scanned document
# read whole (page_select.MAX_PAGES_WITHOUT_TEXT pages) is encoded once for all its questions.
SHARED_PAGES_MAX = 20


class _SharedPages:
    """A document's prepared pages that a later question of it reads again, until its last reader."""

    def __init__(self, plans: list[list[int]]):
        self._readers: dict[int, int] = {}
        for indices in plans:
            for index in indices:
                self._readers[index] = self._readers.get(index, 0) + 1
        self._pages: dict[int, PreparedPage] = {}

    def take(self, index: int) -> PreparedPage | None:
        self._readers[index] = self._readers.get(index, 1) - 1
        return self._pages.get(index) if self._readers[index] > 0 else self._pages.pop(index, None)

    def keep(self, page: PreparedPage) -> None:
        if self._readers.get(page.index, 0) > 0 and len(self._pages) < SHARED_PAGES_MAX:
            self._pages[page.index] = page


def _prepare_unit(asker: Asker, worker: DocumentWorker, unit: Unit, options: AskOptions,
                  shared: _SharedPages) -> Iterator[PreparedItem]:
    file = unit.file
    try:
        assert unit.plan is not None
        if not unit.plan.page_indices:
            raise DocumentError(f"{file}: no page to read; check --pages")
        anyres, highres_scale = asker.encoder.anyres, asker.encoder.highres_scale
        for position, index in enumerate(unit.plan.page_indices):
            page = shared.take(index)
            if page is None:
                source = PageSource(index, render=partial(worker.render, file, index, anyres, options.text_layer, highres_scale),
                                    text=partial(worker.text, file, index))
                page = next(asker.prepare_pages(str(file), [source], unit.sha256, unit.timings, options.text_layer))
                shared.keep(page)
            last = position == len(unit.plan.page_indices) - 1
            # After the last render: MuPDF reports broken streams while rendering.
            notices = worker.notices(file) if last else ReadNotices()
            if last:
                _read_locatable(worker, unit, anyres, options.evidence_ocr)
            yield PageReady(unit, page, last, notices)
    except Exception as error:  # the record says what happened; one bad document never ends the batch
        yield UnitFailed(unit, error)


def _read_locatable(worker: DocumentWorker, unit: Unit, anyres: AnyresConfig, ocr: bool) -> None:
    """The planned pages' words and geometry, read in the worker while it holds the document: the
    answer's page is known only later, when the worker may be rendering the next document."""
    assert unit.plan is not None
    unit.evidence_ocr = ocr
    try:
        unit.locatable = worker.locatable_pages(unit.file, unit.plan.page_indices, anyres, ocr)
    except Exception as error:  # the answer does not need it: its evidence says why there is none
        unit.locating_error = error


Outcome = tuple[Unit, dict[str, Any] | None]  # a unit and its record (None: skipped)


def answer_units(asker: Asker, items: Iterator[PreparedItem], options: AskOptions, *,
                 parallel: int = 1) -> Iterator[Outcome]:
    """Stage C: each unit's record (None for a skipped one), answered by the LLM from its prepared
    pages as ``items`` delivers them. Nothing runs until the next record is asked for."""
    for group in answer_groups(asker, items, options, parallel=parallel):
        yield from group


def answer_groups(asker: Asker, items: Iterator[PreparedItem], options: AskOptions, *,
                  parallel: int = 1) -> Iterator[list[Outcome]]:
    """Stage C by groups: the outcomes of consecutive units whose records come out of one LLM call,
    in the units' order.

    ``parallel`` 1: one unit a group. ``parallel`` N > 1 (the backend loaded with n_seq_max >= N):
    up to N units that one prompt each answers (one planned page, or --together) are answered by
    one ``Asker.answer_many``; the skipped and failed units between them come along in their
    places. A unit read page by page (the most confident page wins), or one whose prompt does not
    fit, ends the group and is answered alone by the one-at-a-time path, which says why it fails.
    """
    if parallel <= 1:
        for item in items:
            yield [_outcome(asker, item, items, options)]
        return
    source = _Lookahead(items)
    for item in source:
        if isinstance(item, PageReady) and not _one_prompt_unit(item.unit, options):
            yield [_outcome(asker, item, source, options)]
            continue
        group: list[_Slot] = []
        while True:
            group.append(_slot(asker, item, source, options))
            # Never wait to fill a group: a unit joins only when the thread that prepares them has it
            # ready (run ahead of the LLM); when the LLM is the slow stage the queue fills while it
            # answers and the groups with it; when it is not, waiting would only idle it.
            if sum(slot.asked is not None for slot in group) >= parallel or not source.waiting():
                break
            item = next(source, None)
            if item is None:
                break
            if isinstance(item, PageReady) and not _one_prompt_unit(item.unit, options):
                source.put_back(item)  # answered alone, after this group
                break
        yield _answer_group(asker, group, options)


class _Lookahead:
    """The prepared items, with one put back (the item that ended a group starts what follows), and
    whether the next is ready without waiting."""

    def __init__(self, items: Iterator[PreparedItem]):
        self._items = items
        self._back: PreparedItem | None = None

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self) -> PreparedItem:
        if self._back is not None:
            item, self._back = self._back, None
            return item
        return next(self._items)

    def put_back(self, item: PreparedItem) -> None:
        self._back = item

    def waiting(self) -> bool:
        if self._back is not None:
            return True
        if isinstance(self._items, RunAhead):
            return self._items.waiting()
        # Without overlap (--pipeline-depth 0) the next unit is prepared in this thread anyway: taking
        # it now costs what taking it after this group would.
        return True


@dataclass
class _Slot:
    """A unit's place in a group: its record, or the question ``answer_many`` is to answer."""

    unit: Unit
    record: dict[str, Any] | None = None
    asked: OnePromptQuestion | None = None
    heard: ReadNotices = field(default_factory=ReadNotices)  # what the worker heard (with the last page)


def _one_prompt_unit(unit: Unit, options: AskOptions) -> bool:
    return unit.plan is not None and (len(unit.plan.page_indices) == 1 or options.together)


def _outcome(asker: Asker, item: PreparedItem, items: Iterator[PreparedItem], options: AskOptions) -> Outcome:
    """One unit's record, the one-at-a-time way."""
    if isinstance(item, Skipped):
        return item.unit, None
    if isinstance(item, UnitFailed):  # before its first page
        return item.unit, _failure_record(asker, item.unit, item.error)
    return item.unit, _answer_unit(asker, item, items, options)


def _slot(asker: Asker, item: PreparedItem, items: Iterator[PreparedItem], options: AskOptions) -> _Slot:
    """``item``'s unit in a group: skipped, failed, or its pages drawn and its question ready."""
    if not isinstance(item, PageReady):
        return _Slot(item.unit, _outcome(asker, item, items, options)[1])
    unit, pages = item.unit, _UnitPages(item, items)
    assert unit.plan is not None
    try:
        drawn = list(pages)  # one page, or the --together pages
    except Exception as error:  # a page failed to render or encode: as the one-at-a-time path records it
        return _Slot(unit, _failure_record(asker, unit, error))
    asked = OnePromptQuestion(str(unit.file), unit.question, drawn, unit.plan.reason, unit.plan.method, unit.timings)
    if not asker.fits_one_prompt(asked, options):
        return _Slot(unit, _answer_drawn(asker, unit, drawn, pages.notices, options))  # it says why
    return _Slot(unit, asked=asked, heard=pages.notices)


def _answer_group(asker: Asker, group: list[_Slot], options: AskOptions) -> list[Outcome]:
    waiting = [slot for slot in group if slot.asked is not None]
    if waiting:
        try:
            answers = asker.answer_many([slot.asked for slot in waiting], options)
        except Exception:  # llama.cpp failed the group: each unit alone, its record saying what went wrong
            for slot in waiting:
                slot.record = _answer_drawn(asker, slot.unit, slot.asked.pages, slot.heard, options)
        else:
            for slot, answer in zip(waiting, answers):
                slot.record = _answered_record(slot.unit, answer, slot.heard)
    return [(slot.unit, slot.record) for slot in group]


class _UnitPages:
    """The pages of the unit ``first`` starts, drawn from ``items`` until its last one (or its failure)."""

    def __init__(self, first: PageReady, items: Iterator[PreparedItem]):
        self._next: PreparedItem | None = first
        self._items = items
        self.ended = False
        self.notices = ReadNotices()  # what the worker heard, on the unit's last page

    def __iter__(self) -> Iterator[PreparedPage]:
        while not self.ended:
            item = self._next if self._next is not None else next(self._items, None)
            self._next = None
            if item is None:
                raise RuntimeError("the prepared pages ended in the middle of a document")
            self.ended = not isinstance(item, PageReady) or item.last
            if isinstance(item, UnitFailed):
                raise item.error
            assert isinstance(item, PageReady)
            self.notices = item.notices
            yield item.page

    def skip_rest(self) -> None:
        """Draw the unit's pages that are left (after a failure): the next unit starts after them."""
        try:
            for _ in self:
                pass
        except Exception:  # the unit's record already says what went wrong first
            pass


def _answer_unit(asker: Asker, first: PageReady, items: Iterator[PreparedItem], options: AskOptions) -> dict[str, Any]:
    unit, pages = first.unit, _UnitPages(first, items)
    assert unit.plan is not None  # a unit's pages come after its plan
    try:
        answer = asker.answer_prepared(str(unit.file), unit.question, pages, len(unit.plan.page_indices),
                                       unit.plan.reason, options, unit.timings, method=unit.plan.method)
    except Exception as error:  # one bad document must never end the batch
        pages.skip_rest()
        return _failure_record(asker, unit, error)
    return _answered_record(unit, answer, pages.notices)


def _answer_drawn(asker: Asker, unit: Unit, pages: list[PreparedPage], heard: ReadNotices,
                  options: AskOptions) -> dict[str, Any]:
    """``_answer_unit`` for a unit whose pages were drawn already."""
    assert unit.plan is not None
    try:
        answer = asker.answer_prepared(str(unit.file), unit.question, pages, len(pages), unit.plan.reason, options,
                                       unit.timings, method=unit.plan.method)
    except Exception as error:  # one bad document must never end the batch
        return _failure_record(asker, unit, error)
    return _answered_record(unit, answer, heard)


def _answered_record(unit: Unit, answer: Answer, heard: ReadNotices) -> dict[str, Any]:
    # What the worker heard opening and rendering (with the last page), and what the cached pages' renders heard.
    answer.warnings = warning_lines(unit.name or unit.file, heard.merged(answer.notices))
    if unit.locating_error is not None:
        answer.evidence = locating_failed(unit.locating_error)
    else:
        answer.evidence = locate_on_pages([page for page in unit.locatable if page.index + 1 in answer.pages],
                                          answer.answer, ocr=unit.evidence_ocr)
    return {**answer.to_json(), "sha256": unit.sha256}


def _failure_record(asker: Asker, unit: Unit, error: Exception) -> dict[str, Any]:
    kind, message = error_of(error, unit.file, known=(WorkerFailure, FilaError))
    return failed_record(unit.file, unit.question, asker.model_name, kind, message, sha256=unit.sha256)


# -- the batch --


def run_batch(asker: Asker, documents: list[Path], questions: list[str], options: AskOptions, sink: RecordSink,
              batch: BatchOptions | None = None, *, done: set | None = None,
              on_record: Callable[[], None] | None = None, on_warning: Callable[[str], None] | None = None,
              should_stop: StopCheck = never_stop, on_notice: Callable[[str], None] | None = None) -> BatchSummary:
    """Answer every (document, question) not in ``done``, one record each to ``sink``, in order.

    ``batch.depth`` > 0: pages are rendered and encoded in a thread, up to that many ahead of the
    LLM (``pipeline.RunAhead``); 0: each page is rendered, encoded and answered in turn.
    ``batch.parallel`` > 1: up to that many units of one prompt each are answered side by side
    (``answer_groups``; the asker's backend loaded with ``n_seq_max`` >= ``parallel``). The records
    are the one-at-a-time batch's, in its order (greedy: the same answers, but where
    ``LlamaBackend.generate_many`` says a later token can differ).
    ``should_stop``: checked between records; True stops the batch after the record(s) in flight,
    written whole (``summary.interrupted``). Runs in any thread: no signal handler is installed.
    ``on_notice``: the crop-boundary notice of each record whose answer a crop boundary cuts
    (fusion off), naming its file.
    """
    batch = batch or BatchOptions()
    check_parallel(batch, asker.backend.n_seq_max)
    summary = BatchSummary()
    worker = DocumentWorker(batch.timeout_s)
    report_warnings = WarningReporter(on_warning or (lambda warning: None))
    hashed = ((file, sha256_or_none(file), None) for file in documents)
    items: Iterator[PreparedItem] = prepare_units(asker, worker, hashed, questions, options, done)
    ahead: RunAhead | None = None
    try:
        if batch.depth > 0:
            items = ahead = RunAhead(items, batch.depth, name="fila-batch-prepare")
        groups = answer_groups(asker, items, options, parallel=batch.parallel)
        while not should_stop():
            group = next(groups, None)
            if group is None:
                break
            for _unit, record in group:  # the records in flight: written whole, even after a stop request
                if record is None:
                    summary.skipped += 1
                else:
                    sink.write(record)
                    summary.count(record)
                    report_warnings(record)
                    notice = record_notice(record, fusion=asker.fusion) if on_notice is not None else None
                    if notice is not None:
                        on_notice(notice)
                if on_record is not None:
                    on_record()
        summary.interrupted = should_stop()
        return summary
    finally:
        if ahead is not None:
            ahead.close()  # before the worker closes: the producer may be rendering in it
        worker.close()


def check_parallel(batch: BatchOptions, n_seq_max: int) -> None:
    """UsageError when the model was loaded to answer fewer questions side by side than ``batch.parallel``."""
    if batch.parallel > n_seq_max:
        raise UsageError(f"--parallel {batch.parallel}: the model was loaded to answer {n_seq_max} at a time")


def sha256_or_none(file: Path) -> str | None:
    try:
        return file_sha256(file)
    except (OSError, FilaError):
        return None


def answer_document(asker: Asker, worker: DocumentWorker, file: Path, sha256: str | None, questions: list[str],
                    options: AskOptions, *, name: str | None = None) -> list[dict[str, Any]]:
    """Every question about one document, one record each (a Ray worker's unit of work). ``name``:
    the path as the user gave it, which the warnings name (``file`` is the one to open)."""
    items = prepare_units(asker, worker, [(file, sha256, name)], questions, options)
    return [record for _, record in answer_units(asker, items, options)]
