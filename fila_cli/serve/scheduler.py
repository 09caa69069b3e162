"""Requests sharing one model: a bounded queue, a preparing thread and an LLM thread.

    preparing thread:  plan (worker) -> render (worker) + encode, page by page   [request i+1]
    LLM thread:        answer from the prepared pages, streaming text             [request i]

As in ``fila batch``'s pipeline, the next request's pages are rendered and encoded while the LLM
answers the current one, and each request's pages reach the LLM through a small per-request queue
(memory: ``pipeline_depth`` pages ahead). The LLM answers one request at a time, in arrival order.

Only what runs on the LLM is serialised: a chat turn is a function run in the LLM thread, between
two answers.

The asyncio side (the HTTP handlers) and the threads meet in ``Job``: the threads emit events
(text deltas, then the record or an error) that the event loop receives; the handler cancels a
job when its client goes away, and the threads stop it at the next token or page.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fila_cli.serve.engine import AskOptions, Engine, Planned

# How often a thread blocked on a full page queue looks whether its request is still wanted (seconds).
_POLL_S = 0.1
# Retry-After when nothing was answered yet to estimate from (seconds).
_DEFAULT_RETRY_AFTER_S = 5
# Answers remembered to estimate how long the queue takes to drain.
_RECENT_ANSWERS = 16


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests: come back after ``retry_after_s``."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"the server's queue is full ({waiting} requests waiting); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Stopping(Exception):
    """The server is shutting down and takes no more requests."""


class Cancelled(Exception):
    """The request's client went away, or the server is stopping: its work ends at the next token."""


class Job:
    """One request on its way through the threads; its events reach the event loop that made it.

    Events are (kind, value): ("delta", text) any number of times, then exactly one of
    ("record", dict) or ("error", exception).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.finished = threading.Event()

    def emit(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def finish(self, kind: str, value: Any) -> None:
        if not self.finished.is_set():
            self.finished.set()
            self.emit(kind, value)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise ``Cancelled`` when the job is no longer wanted (called at each token and page)."""
        if self._cancelled.is_set():
            raise Cancelled


@dataclass
class AskWork:
    file: Path  # the upload on the server
    name: str  # as the client named it
    question: str
    options: AskOptions
    stream: bool


class _PagesFailed:
    def __init__(self, error: BaseException):
        self.error = error


class _Prepared:
    """A planned request handed to the LLM thread, its pages arriving in ``pages``."""

    def __init__(self, job: Job, work: AskWork, planned: Planned, depth: int):
        self.job = job
        self.work = work
        self.planned = planned
        self.pages: queue.Queue = queue.Queue(maxsize=depth)

    def items(self) -> Iterator[Any]:
        for _ in range(self.planned.n_pages):
            item = self.pages.get()
            if isinstance(item, _PagesFailed):
                raise item.error
            yield item


LlmCall = Callable[[Job], dict[str, Any]]


class Scheduler:
    """The queue and the two threads. ``max_queue``: requests admitted and not yet started by the
    LLM; past it ``admit`` raises ``QueueFull``. With an engine loaded to answer N questions side by
    side (``--parallel N``), up to N planned questions of one prompt each, asked with the same
    options, are answered in one LLM step (``Engine.answer_side_by_side``); their text comes whole,
    not token by token, and a cancelled one is dropped before its group starts, not during it."""

    def __init__(self, engine: Engine, *, max_queue: int, pipeline_depth: int = 1):
        self.engine = engine
        self.max_queue = max_queue
        self.pipeline_depth = max(1, pipeline_depth)
        self._lock = threading.Lock()
        self._waiting = 0  # admitted, the LLM not started on them
        self._in_flight = 0  # admitted, not finished
        self._stopping = False
        self._jobs: set[Job] = set()
        self._recent_s: deque[float] = deque(maxlen=_RECENT_ANSWERS)
        self.last_activity = time.monotonic()
        self.llm_owner: object | None = None  # the chat session whose context the LLM holds (None: unknown)
        self._prepare_queue: queue.Queue = queue.Queue()
        self._llm_queue: queue.Queue = queue.Queue()
        self._held: deque = deque()  # taken from the LLM queue while grouping, not joinable: next in turn
        self.parallel = engine.parallel
        self.answered_side_by_side = 0  # questions answered in groups of two or more (--parallel)
        self._worker = engine.new_worker()  # the preparing thread's alone
        self._threads = [threading.Thread(target=self._prepare_loop, name="fila-serve-prepare", daemon=True),
                         threading.Thread(target=self._llm_loop, name="fila-serve-llm", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- admission --

    def submit_ask(self, job: Job, work: AskWork) -> None:
        self._admit(job)
        self._prepare_queue.put((job, work))

    def submit_llm(self, job: Job, call: LlmCall) -> None:
        """Run ``call(job)`` in the LLM thread, in turn; its return value is the job's record."""
        self._admit(job)
        self._llm_queue.put((job, call))

    def _admit(self, job: Job) -> None:
        with self._lock:
            if self._stopping:
                raise Stopping("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(self._waiting, self._retry_after_s())
            self._waiting += 1
            self._in_flight += 1
            self._jobs.add(job)
            self.last_activity = time.monotonic()

    def _retry_after_s(self) -> int:
        if not self._recent_s:
            return _DEFAULT_RETRY_AFTER_S
        mean = sum(self._recent_s) / len(self._recent_s)
        return max(1, math.ceil(mean * max(1, self._waiting)))

    def _started(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _done(self, job: Job, seconds: float | None = None) -> None:
        with self._lock:
            self._in_flight -= 1
            self._jobs.discard(job)
            if seconds is not None:
                self._recent_s.append(seconds)
            self.last_activity = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since the last request came or ended; 0 while one is in flight."""
        with self._lock:
            return 0.0 if self._in_flight else time.monotonic() - self.last_activity

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": self._waiting, "in_flight": self._in_flight, "max_queue": self.max_queue,
                    "parallel": self.parallel, "answered_side_by_side": self.answered_side_by_side}

    # -- the preparing thread --

    def _prepare_loop(self) -> None:
        while True:
            entry = self._prepare_queue.get()
            if entry is None:
                return
            job, work = entry
            if job.cancelled:
                self._fail_before_llm(job, Cancelled())
                continue
            try:
                planned = self.engine.plan(self._worker, work.file, work.name, work.question, work.options)
            except Exception as error:  # the record says what happened; the server goes on
                self._fail_before_llm(job, error)
                continue
            prepared = _Prepared(job, work, planned, self.pipeline_depth)
            self._llm_queue.put((job, prepared))
            try:
                for item in self.engine.prepare(self._worker, planned, work.options):
                    if not self._hand_over(prepared, item):
                        break
            except Exception as error:
                self._hand_over(prepared, _PagesFailed(error))

    def _hand_over(self, prepared: _Prepared, item: Any) -> bool:
        """Put ``item`` in the request's page queue, unless the LLM is done with the request."""
        while not prepared.job.finished.is_set() and not prepared.job.cancelled:
            try:
                prepared.pages.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _fail_before_llm(self, job: Job, error: BaseException) -> None:
        self._started()
        job.finish("error", error)
        self._done(job)

    # -- the LLM thread --

    def _next_entry(self) -> Any:
        return self._held.popleft() if self._held else self._llm_queue.get()

    def _llm_loop(self) -> None:
        while True:
            entry = self._next_entry()
            if entry is None:
                return
            job, work = entry
            self._started()
            if isinstance(work, _Prepared) and self.parallel > 1 and self._joinable(work, work):
                group = self._group(work)
                if len(group) > 1:
                    self._answer_group(group)
                    continue
            started = time.perf_counter()
            try:
                job.check()
                if isinstance(work, _Prepared):
                    self.llm_owner = None
                    record = self._answer(work)
                else:
                    record = work(job)
            except BaseException as error:
                job.finish("error", error)
                self._done(job)
                continue
            job.finish("record", record)
            self._done(job, time.perf_counter() - started)

    # -- several questions side by side (--parallel) --

    def _joinable(self, first: _Prepared, other: Any) -> bool:
        """Whether ``other`` may be answered in one step with ``first``: a planned question of one
        prompt, asked with the same options (sampling included), not cancelled."""
        return (isinstance(other, _Prepared) and not other.job.cancelled and other.work.options == first.work.options
                and self.engine.one_prompt(other.planned, other.work.options))

    def _group(self, first: _Prepared) -> list[_Prepared]:
        """``first`` and the questions waiting behind it that may join it (never waiting for more:
        a group fills when requests queue up, which is when it pays)."""
        group = [first]
        while len(group) < self.parallel:
            try:
                entry = self._llm_queue.get_nowait()
            except queue.Empty:
                break
            if entry is None or not self._joinable(first, entry[1]):
                self._held.append(entry)  # answered after the group, in its turn
                break
            self._started()
            group.append(entry[1])
        return group

    def _answer_group(self, group: list[_Prepared]) -> None:
        started = time.perf_counter()
        self.llm_owner = None
        drawn = []
        for prepared in group:
            try:
                drawn.append((prepared, list(prepared.items())))
            except BaseException as error:  # its page failed: its error, the others go on
                prepared.job.finish("error", error)
                self._done(prepared.job)
        if not drawn:
            return
        try:
            records = self.engine.answer_side_by_side([(p.planned, items) for p, items in drawn], group[0].work.options)
        except BaseException as error:
            records = [error] * len(drawn)
        seconds = (time.perf_counter() - started) / len(drawn)
        if len(drawn) > 1:
            self.answered_side_by_side += len(drawn)
        for (prepared, _), record in zip(drawn, records):
            if isinstance(record, BaseException):
                prepared.job.finish("error", record)
                self._done(prepared.job)
                continue
            if prepared.work.stream:  # no token-by-token text side by side: the answer in one delta
                prepared.job.emit("delta", record["answer"])
            prepared.job.finish("record", record)
            self._done(prepared.job, seconds)

    def _answer(self, prepared: _Prepared) -> dict[str, Any]:
        job = prepared.job

        def on_text(piece: str) -> None:
            job.check()
            if prepared.work.stream:
                job.emit("delta", piece)

        def on_page(done: int, total: int) -> None:
            job.check()

        return self.engine.answer(prepared.planned, prepared.items(), prepared.work.options, on_text, on_page)

    # -- shutdown --

    def close(self, *, cancel: bool = True) -> None:
        """Take no more requests; cancel the ones left (``cancel``) or let them finish; stop the threads."""
        with self._lock:
            self._stopping = True
            jobs = list(self._jobs)
        if cancel:
            for job in jobs:
                job.cancel()
        self._prepare_queue.put(None)
        self._llm_queue.put(None)
        for thread in self._threads:
            thread.join()
        self._worker.close()
        for job in jobs:  # queued behind the threads' stop: never started
            job.finish("error", Stopping("the server is shutting down"))
