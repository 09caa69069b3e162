"""One overlapped batch pipeline fed with documents by several threads, each waiting for its own records.

``fila batch --ray`` hands its actors one document per call. Answered call by call
(``batch.answer_document``), a worker renders, encodes and answers in turn, and its stages never
overlap. A ``DocumentPipeline`` is the local batch's pipeline kept alive across calls: the actor
takes several calls at once (one thread each), every call puts its document on a queue and waits,
and a single pipeline behind the queue answers the documents in the order they came:

    caller threads --submit(document)--> queue --> prepare_units (RunAhead thread: render in the
    document worker, encode) --depth pages ahead--> answer_units (the LLM thread) --> each caller's
    records

So the next document is rendered and encoded while the LLM answers the current one, exactly as in
``run_batch``: the same ``prepare_units`` and ``answer_units``, the same ``RunAhead`` bound on the
pages made ahead (memory: ``depth`` pages of visual tokens), one document worker with its
per-document ``--timeout``, one LLM used by one thread. Every unit ends in exactly one record and
both stages walk the documents in queue order, so a document's records are those of
``answer_document``, whatever else is in flight.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fila_cli.qa.ask import Asker, AskOptions
from fila_cli.qa.batch import PreparedItem, answer_units, prepare_units
from fila_cli.qa.isolation import DocumentWorker
from fila_cli.qa.pipeline import RunAhead


@dataclass
class _Job:
    """A submitted document: its questions, and the records answered so far."""

    file: Path
    sha256: str | None
    questions: list[str]
    name: str | None
    records: list[dict[str, Any]] = field(default_factory=list)
    done: Future = field(default_factory=Future)  # the records, once there is one per question


_CLOSED = None  # on the queue of documents: no more will come


class _DocumentQueue:
    """Documents in submission order: the preparing thread takes them, the LLM thread tracks them."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._waiting: deque[_Job | None] = deque()  # not yet taken by the preparing thread
        self.in_flight: deque[_Job] = deque()  # submitted, records not all answered: the LLM's order
        self._broken: BaseException | None = None

    def put(self, job: _Job | None) -> None:
        with self._condition:
            if self._broken is not None and job is not _CLOSED:
                job.done.set_exception(self._broken)
                return
            if job is not _CLOSED:
                self.in_flight.append(job)  # under the lock: both queues keep one order
            self._waiting.append(job)
            self._condition.notify()

    def fail(self, error: BaseException) -> None:
        """The pipeline broke: every caller waiting, and every later one, gets ``error``."""
        with self._condition:
            self._broken = error
            while self.in_flight:
                self.in_flight.popleft().done.set_exception(error)

    def take(self) -> Iterator[_Job]:
        """The documents as they are submitted, until the queue is closed (blocks in between)."""
        while True:
            with self._condition:
                self._condition.wait_for(lambda: bool(self._waiting))
                job = self._waiting.popleft()
            if job is _CLOSED:
                return
            yield job


class DocumentPipeline:
    """Answer documents submitted from any thread, ``depth`` (>= 1) pages prepared ahead of the LLM.

    ``submit`` blocks until the document's records are ready and returns them, one per question,
    in question order. ``close`` stops the pipeline after the documents already submitted.
    """

    def __init__(self, asker: Asker, worker: DocumentWorker, options: AskOptions, depth: int):
        self._asker, self._worker, self._options = asker, worker, options
        self._queue = _DocumentQueue()
        self._ahead = RunAhead(self._prepared(), depth, name="fila-pipeline-prepare")
        self._llm = threading.Thread(target=self._answer, name="fila-pipeline-llm", daemon=True)
        self._llm.start()

    def submit(self, file: Path, sha256: str | None, questions: list[str], name: str | None = None) -> list[dict[str, Any]]:
        if not questions:
            return []
        job = _Job(file, sha256, list(questions), name)
        self._queue.put(job)
        return job.done.result()

    def _prepared(self) -> Iterator[PreparedItem]:
        """Stages A and B (the ``RunAhead`` thread): each document's pages, in submission order."""
        for job in self._queue.take():
            yield from prepare_units(self._asker, self._worker, [(job.file, job.sha256, job.name)], job.questions,
                                     self._options)

    def _answer(self) -> None:
        """Stage C (the LLM thread): records to the documents' callers, in submission order."""
        in_flight = self._queue.in_flight
        try:
            for _, record in answer_units(self._asker, self._ahead, self._options):
                job = in_flight[0]
                job.records.append(record)
                if len(job.records) == len(job.questions):  # prepare_units: one unit per question
                    in_flight.popleft()
                    job.done.set_result(job.records)
        except BaseException as error:  # a bug, not a document: no caller may wait for ever
            self._queue.fail(error)  # they raise it in their own threads

    def close(self) -> None:
        """Answer what was submitted, then stop both threads (the document worker is the caller's)."""
        self._queue.put(_CLOSED)
        self._llm.join()
        self._ahead.close()
        self._queue.fail(RuntimeError("the document pipeline is closed"))  # for a submit after this
