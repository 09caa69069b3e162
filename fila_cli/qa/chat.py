"""A conversation with a document (``fila chat``): the page is read once, every question after
costs only its own words.

The LLM's context is laid out as::

    [prompt start, page(s)] [question 1, answer 1] [follow-up 2, answer 2] ...
     `-- the page state --'  `------------- the turns, oldest first -------------'

- The page state is decoded once per page set (or loaded from the prefix store on disk, when
  ``fila ask`` or another chat read the page before) and kept in memory.
- Each turn is appended to llama.cpp's KV cache: a follow-up decodes only its own text (the
  template's end of the previous answer, the question, the start of the next answer).
- When the next turn would not fit, the oldest turns are dropped: the page state is restored and
  the kept turns' token ids decoded again (text only, cheap next to the page). The page is never
  dropped; a question that cannot fit even alone is refused.
- Several pages (``--pages 2,9`` or ``add_page``) share the context, each introduced by its page
  number, as ``fila ask --together``.
- With ``text_layer`` the pages' text goes before the first question kept in the context, exactly
  where ``fila ask --text-layer`` puts it: the first turn's prompt is ``fila ask``'s, and the text
  stays in the context as long as the page does (dropping old turns moves it to the first kept one).

    session = ChatSession(asker, open_document("report.pdf"), AskOptions(pages="2"))
    print(session.ask("What is the total?").answer)
    print(session.ask("And without VAT?").answer)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fila_cli.atomic_files import check_output_folder, write_bytes_atomically
from fila_cli.documents.document import Document, page_index_from_user, parse_page_spec
from fila_cli.documents.evidence import Evidence
from fila_cli.documents.notices import ReadNotices, document_warnings
from fila_cli.documents.page_select import METHOD_GIVEN
from fila_cli.errors import FilaError, UsageError
from fila_cli.llm import ContextOverflowError, PrefixState
from fila_cli.qa.answer_evidence import locate_on_document
from fila_cli.qa.ask import Asker, AskOptions
from fila_cli.qa.choice import confidence
from fila_cli.qa.pages import PageSource, PreparedPage
from fila_cli.qa.records import Answer, chat_record, failed_record, rounded_confidence
from fila_cli.qa.timings import Timings

TextCallback = Callable[[str], None]
StopCheck = Callable[[], bool]
Notice = Callable[[str], None]
PageSourceOf = Callable[[int], PageSource]  # a page's source by its 0-based index

# page_choice methods of a chat, beside page_select's "--pages".
METHOD_DEFAULT = "first page"
METHOD_COMMAND = "/page"


class AnswerInterrupted(Exception):
    """Raised inside generation when the user asked to stop (Ctrl-C); the session goes on."""


@dataclass
class Turn:
    """One question and its answer, as the transcript and ``--json`` lines hold it."""

    question: str
    answer: str
    pages: list[int]  # 1-based pages in the context when it was asked
    answer_ids: list[int] = field(repr=False)  # the answer's token ids, as decoded in the KV cache
    confidence: float | None
    interrupted: bool
    timings: Timings
    # visual: tokens of the pages in context; prompt: text tokens decoded for this turn;
    # visual_decoded: visual tokens decoded for this turn (0 once the page is in the context);
    # generated: answer tokens.
    tokens: dict[str, int]
    dropped_turns: int = 0  # oldest turns dropped just before this one, to make room
    evidence: Evidence | None = None  # where the answer is on the pages in context (answer_evidence)

    def to_json(self) -> dict[str, Any]:
        """The turn in a transcript (``ChatSession.save``); ``ChatSession.record`` is its output record."""
        return {"question": self.question, "answer": self.answer, "pages": self.pages,
                "confidence": rounded_confidence(self.confidence), "interrupted": self.interrupted,
                "timings": self.timings.to_json(), "tokens": dict(self.tokens), "dropped_turns": self.dropped_turns}


class ChatSession:
    """A loaded model talking about one open document."""

    def __init__(self, asker: Asker, document: Document, options: AskOptions | None = None, *,
                 on_notice: Notice | None = None, owns_document: bool = False,
                 page_source: PageSourceOf | None = None):
        """``owns_document``: ``close`` closes the document too (else its opener does).
        ``page_source``: where page N (0-based) is rendered; default: from ``document``, in this
        process (``fila serve`` renders an upload in its isolated document worker instead)."""
        self.asker = asker
        self.document = document
        self._owns_document = owns_document
        self._page_source = page_source
        self.options = options or AskOptions()
        self.file = str(document.path)
        self.on_notice = on_notice or (lambda message: None)
        self.history: list[Turn] = []  # every turn of the session, for the transcript
        self._context: list[Turn] = []  # the turns in the KV cache, oldest first
        self.pages: list[PreparedPage] = []
        self.page_method = METHOD_DEFAULT
        self.page_detail = ""
        self._page_state: PrefixState | None = None
        # What MuPDF said about every page read in this session (rendered now or cached with its tokens).
        self._notices = ReadNotices()
        self._sha256 = document.content_hash() if asker.caches_on else None
        self._before = asker.prompts.prompt_start()
        self._eos_text = asker.backend.token_text(asker.backend.eos)
        # What reading the pages cost, charged to the next turn (as `fila ask` charges it to its answer).
        self._load_timings = Timings()
        if self.options.pages is not None:
            indices = parse_page_spec(self.options.pages, document.page_count, name=document.path)
            self.load_pages(indices, METHOD_GIVEN, "pages given with --pages")
        else:
            self.load_pages([0], METHOD_DEFAULT, "a chat starts on page 1; /page N moves to another")

    # -- facts --

    @property
    def backend(self):
        return self.asker.backend

    @property
    def page_numbers(self) -> list[int]:
        return [page.index + 1 for page in self.pages]

    @property
    def n_visual(self) -> int:
        return sum(len(page.visual) for page in self.pages)

    @property
    def context_used(self) -> int:
        return self.backend.n_past

    @property
    def warnings(self) -> list[str]:
        return document_warnings(self.document, self._notices)

    @property
    def turns_in_context(self) -> int:
        return len(self._context)

    # -- pages --

    def load_pages(self, indices: list[int], method: str, detail: str) -> None:
        """Make ``indices`` (0-based) the pages in the context, decoded once; the conversation so
        far is kept (its oldest turns dropped if it no longer fits)."""
        timings = Timings()
        prepared = [self.asker.pages.prepare_page(self.file, self._source(i), self._sha256, timings) for i in indices]
        if self.options.text_layer:  # read once here, not at every turn that counts its length
            prepared = [p if p.text is not None else dataclasses.replace(p, text=self._source(p.index).text())
                        for p in prepared]
        self._notices = self._notices.merged(*(p.notices for p in prepared))
        segments = self.asker.prompts.pages_segments(self._before, prepared)
        self.asker.prompts.check_fits(self.file, segments, self._turn_text("?", first=True, pages=prepared),
                                      hint="/page N to read one page")
        before = list(self._context)

        def settle() -> list[Turn]:
            """The pages' state (the prefix module's: from memory, disk or decoded), restored with
            the turns that still fit; a stored state llama.cpp refuses is dropped and decoded again."""
            state, prefill_s = self.asker.prefix.state(segments, prepared)
            self.pages, self._page_state = prepared, state
            kept = self._fitting_turns(before, None)
            self._restore(kept)
            timings.prefill_s = prefill_s
            return kept

        kept = self.asker.prefix.retrying_refused(segments, prepared, settle)
        self._load_timings.add(timings)
        self.page_method, self.page_detail = method, detail
        if len(prepared) > 1:
            self.page_detail += f"; pages {', '.join(map(str, self.page_numbers))} together ({self.n_visual} visual tokens)"
        self._say_dropped(len(before) - len(kept))

    def go_to_page(self, number: int) -> None:
        """Read page ``number`` (1-based) instead of the pages in the context."""
        index = page_index_from_user(number, self.document.page_count, name=self.document.path)
        self.load_pages([index], METHOD_COMMAND, f"moved to page {number} with /page")

    def add_page(self, number: int) -> None:
        """Add page ``number`` (1-based) to the pages in the context; refused, with the numbers, when
        the context cannot hold them all."""
        index = page_index_from_user(number, self.document.page_count, name=self.document.path)
        if index in [page.index for page in self.pages]:
            return
        indices = sorted([page.index for page in self.pages] + [index])
        self.load_pages(indices, METHOD_COMMAND, f"added page {number} with /page +{number}")

    def _source(self, index: int) -> PageSource:
        if self._page_source is not None:
            return self._page_source(index)
        return self.asker.pages.local_source(self.document, index, self.options.text_layer)

    # -- turns --

    def _turn_text(self, question: str, *, first: bool, pages: list[PreparedPage] | None = None) -> str:
        """A turn's text after the pages (first: with their text layer, under --text-layer) or after
        the previous answer. ``pages``: those about to be loaded (default: those in the context)."""
        if first:
            return self.asker.prompts.first_turn(question, self.pages if pages is None else pages, self.options.text_layer)
        return self.asker.prompts.follow_up(question, self._eos_text)

    def _turns_length(self, turns: list[Turn]) -> int:
        return sum(len(self.backend.tokenize(self._turn_text(t.question, first=i == 0))) + len(t.answer_ids)
                   for i, t in enumerate(turns))

    def _fitting_turns(self, turns: list[Turn], question: str | None) -> list[Turn]:
        """The newest turns that fit beside the pages and, when given, ``question`` with room for its answer."""
        page_length = self._page_state.n_tokens
        room = self.backend.n_ctx - page_length
        kept = list(turns)
        while kept:
            needed = self._turns_length(kept)
            if question is not None:
                needed += len(self.backend.tokenize(self._turn_text(question, first=False)))
                needed += self.options.sampling.max_tokens
            if needed <= room:
                break
            kept.pop(0)
        return kept

    def _restore(self, turns: list[Turn]) -> None:
        """Context = the page state, then ``turns`` decoded again (text only)."""
        self.backend.load_state(self._page_state)
        self._context = []
        for turn in turns:
            self.backend.prefill([self._turn_text(turn.question, first=not self._context)], append=True)
            self.backend.decode_token_ids(turn.answer_ids)
            self._context.append(turn)

    def _say_dropped(self, n: int) -> int:
        if n > 0:
            self.on_notice(f"the context is full: dropped the oldest {n} turn{'s' if n > 1 else ''} of the "
                           "conversation (the page stays)")
        return n

    def ask(self, question: str, on_text: TextCallback | None = None, should_stop: StopCheck | None = None) -> Turn:
        """Answer ``question`` in the conversation. ``should_stop`` (checked as text streams) ends the
        answer early: the partial answer is kept as the turn, marked ``interrupted``."""
        question = question.strip()
        if not question:
            raise UsageError("the question is empty")
        kept = self._fitting_turns(self._context, question)
        dropped = self._say_dropped(len(self._context) - len(kept))
        if dropped:
            self._restore(kept)
        text = self._turn_text(question, first=not self._context)
        n_text = len(self.backend.tokenize(text))
        if self.backend.n_past + n_text + 1 > self.backend.n_ctx:
            raise ContextOverflowError(
                f"{self.file}: the question needs {n_text} tokens but only {self.backend.n_ctx - self.backend.n_past} "
                f"of the context's {self.backend.n_ctx} are left beside the page; ask a shorter question",
                n_needed=self.backend.n_past + n_text + 1, n_ctx=self.backend.n_ctx)
        stats_before = (self.backend.stats.text_tokens, self.backend.stats.embedding_rows)
        answer_start = self.backend.n_past + n_text

        first_piece_at: list[float] = []  # when the first token came: the prefill's end

        def emit(piece: str) -> None:
            if not first_piece_at:
                first_piece_at.append(time.perf_counter())
            if should_stop is not None and should_stop():
                raise AnswerInterrupted
            if on_text is not None:
                on_text(piece)

        started = time.perf_counter()
        generation = None
        try:
            generation = self.backend.continue_generation([text], self.options.sampling, on_text=emit)
        except AnswerInterrupted:
            pass
        except BaseException:
            self._restore(self._context)  # e.g. a second Ctrl-C outside the answer: back to a known state
            raise
        elapsed = time.perf_counter() - started
        # An interrupted answer has no generation's own timings: the prefill ran until its first
        # piece of text, the generation from there until the stop.
        prefill_s = (first_piece_at[0] - started) if first_piece_at else elapsed
        decoded_text = self.backend.stats.text_tokens - stats_before[0]
        decoded_visual = self.backend.stats.embedding_rows - stats_before[1]
        answer_ids, complete = self._settle_answer(answer_start, generation)
        turn = Turn(
            question=question,
            answer=self._text_of(answer_ids) if generation is None else generation.text.strip(),
            pages=self.page_numbers,
            answer_ids=answer_ids,
            confidence=None if generation is None else confidence(generation.mean_logprob),
            interrupted=generation is None,
            timings=dataclasses.replace(self._load_timings,
                                        prefill_s=self._load_timings.prefill_s + (generation.prefill_s if generation else prefill_s),
                                        generate_s=generation.generate_s if generation else elapsed - prefill_s),
            tokens={"visual": self.n_visual, "prompt": decoded_text, "visual_decoded": decoded_visual,
                    "generated": len(answer_ids)},
            dropped_turns=dropped,
        )
        turn.evidence = locate_on_document(self.document, turn.pages, turn.answer, self.asker.encoder.anyres,
                                           ocr=self.options.evidence_ocr)
        self._load_timings = Timings()
        self.history.append(turn)
        self._context.append(turn)
        if not complete:  # the answer's tail could not be decoded (context full): next turn starts afresh
            self._restore(self._fitting_turns(self._context, None))
        return turn

    def _settle_answer(self, answer_start: int, generation) -> tuple[list[int], bool]:
        """The answer's token ids, all of them in the KV cache when there is room: generation stops
        without decoding its last token (at max_tokens) and an interrupted one may stop mid-way."""
        decoded = [int(t) for t in self.backend.llama.input_ids[answer_start:self.backend.n_past]]
        if generation is None:
            return decoded, True
        missing = generation.token_ids[len(decoded):]
        if self.backend.n_past + len(missing) > self.backend.n_ctx:
            return list(generation.token_ids), False
        self.backend.decode_token_ids(missing)
        return list(generation.token_ids), True

    def _text_of(self, token_ids: list[int]) -> str:
        return b"".join(self.backend.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace").strip()

    def recover(self) -> None:
        """Back to the pages and the turns kept, after an interruption left the LLM mid-decode."""
        self._restore(self._context)

    def clear(self) -> None:
        """Forget the conversation (the pages stay in the context)."""
        self._restore([])

    # -- records --

    def record(self, turn: Turn) -> dict[str, Any]:
        """One ``--json`` line: the record (``records``), plus the turn's own keys."""
        return chat_record(self.answer_of(turn), self.history.index(turn) + 1, turn.interrupted, turn.dropped_turns)

    def answer_of(self, turn: Turn) -> Answer:
        """The turn as an ``Answer``: what ``fila ask`` would say of it."""
        return Answer(file=self.file, question=turn.question, answer=turn.answer, pages=list(turn.pages),
                      confidence=turn.confidence, model=self.asker.model_name, timings=turn.timings,
                      tokens=dict(turn.tokens), page_reason=self.page_detail, page_method=self.page_method,
                      warnings=self.warnings, evidence=turn.evidence)

    def failed_record(self, question: str, error: FilaError) -> dict[str, Any]:
        """The ``--json`` line of a question that got no answer: a failed record, as batch writes it."""
        return chat_record(failed_record(self.file, question, self.asker.model_name, error.kind, str(error)),
                           None, None, None)

    def close(self) -> None:
        if self._owns_document:
            self.document.close()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def transcript(self) -> dict[str, Any]:
        return {"file": self.file, "model": self.asker.model_name, "pages": self.page_numbers,
                "warnings": self.warnings, "turns": [turn.to_json() for turn in self.history]}

    def save(self, path: str | Path) -> Path:
        """Write the transcript as JSON, atomically (a kill leaves the old file or the new one)."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise UsageError(f"{path}: the transcript is JSON; name it *.json")
        check_output_folder(path)
        try:
            write_bytes_atomically(path, (json.dumps(self.transcript(), ensure_ascii=False, indent=2) + "\n").encode())
        except OSError as error:
            raise UsageError(f"{path}: cannot write the transcript ({error.strerror or error}); check the folder") from None
        return path
