"""Answering a question about a document: pages in, visual tokens, LLM answer out.

    from fila_cli.qa.ask import Asker, AskOptions
    asker = Asker.load(resolve_bundle("llava-1.6-mistral-7b"))
    answer = asker.ask("report.pdf", "What is the total due?")
    print(answer.answer, answer.pages)

The model (vision encoder + LLM) loads once per ``Asker``; ``fila batch`` reuses one for every
document.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fila_cli.bundles.bundle import Bundle
from fila_cli.disk_cache import BYTES_PER_GB, CacheBudget
from fila_cli.documents.document import DEFAULT_MAX_PIXELS, Document, open_document
from fila_cli.documents.notices import ReadNotices, document_warnings, page_notices
from fila_cli.documents.page_select import METHOD_ALL, plan_pages
from fila_cli.documents.render import RenderedPage, render_for_canvas
from fila_cli.errors import ModelError
from fila_cli.llm import (
    ContextOverflowError,
    Generation,
    LlamaBackend,
    LlamaSettings,
    PrefixState,
    StateRefusedError,
)
from fila_cli.llm.prefix_store import PREFIX_DIR_NAME, PrefixStore, prefix_cache_key
from fila_cli.llm.templates import PromptTemplate, select_template
from fila_cli.qa.options import AskOptions, ModelOptions
from fila_cli.vision.loaders.identity import file_identity
from fila_cli.vision.model.encoder import EncodedPage, HybridEncoder
from fila_cli.vision.token_cache import TokenCache, default_cache_dir, token_cache_key

TextCallback = Callable[[str], None]
# Called with (pages done, pages in all) while several pages are read one after another.
PageProgress = Callable[[int, int], None]

# The page's text layer, when --text-layer asks for it, is cut to this many characters so that it
# cannot crowd the image out of the context.
MAX_TEXT_LAYER_CHARS = 4000


def page_label(index: int, first: bool) -> str:
    """The text that introduces a page's visual tokens when several pages share one prompt."""
    return ("" if first else "\n") + f"Page {index + 1}:\n"


@dataclass
class Answer:
    file: str
    question: str
    answer: str
    pages: list[int]  # 1-based pages the answer came from
    confidence: float | None  # exp(mean log-probability of the answer's tokens), 0..1
    model: str
    timings: dict[str, float]
    tokens: dict[str, int]
    page_reason: str = ""  # why these pages were read, in words
    page_method: str = METHOD_ALL  # how: page_select.METHOD_* ("--pages", "text-layer BM25", ...)
    warnings: list[str] = field(default_factory=list)  # the document was damaged, partly unreadable...
    # What MuPDF said about the pages read (rendered now, or cached with their tokens): the caller
    # turns it into ``warnings`` with what it said opening the document.
    notices: ReadNotices = field(default_factory=ReadNotices, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The documented JSON schema of ``fila ask --json`` (README: Output)."""
        return {
            "file": self.file,
            "question": self.question,
            "answer": self.answer,
            "pages": self.pages,
            "confidence": None if self.confidence is None else round(self.confidence, 6),
            "model": self.model,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "tokens": dict(self.tokens),
            "page_choice": {"method": self.page_method, "detail": self.page_reason},
            "warnings": list(self.warnings),
        }


@dataclass
class PageSource:
    """A page that is rendered only if its visual tokens are not cached."""

    index: int  # 0-based
    render: Callable[[], RenderedPage]
    text: Callable[[], str]  # the text layer alone (cheap), for --text-layer on a cached page


@dataclass
class _PageAnswer:
    page: int  # 0-based
    text: str
    mean_logprob: float
    visual_tokens: int
    prompt_tokens: int
    generated_tokens: int
    notices: ReadNotices


@dataclass
class PreparedPage:
    """A page's visual tokens, ready for a prompt, and what they are keyed by."""

    index: int  # 0-based
    visual: np.ndarray  # [n_tokens, llm width] float32
    visual_key: str | None  # the token cache's key (None without a document hash)
    text: str | None  # the text layer: rendered with the page, or read by prepare_pages with --text-layer
    notices: ReadNotices = field(default_factory=ReadNotices)  # what MuPDF said rendering it (now or when cached)


@dataclass
class OnePromptQuestion:
    """A question one prompt answers: about one page, or several pages read together (--together);
    what ``Asker.answer_many`` takes."""

    file: str
    question: str
    pages: list[PreparedPage]
    reason: str  # why these pages (page_choice.detail)
    method: str  # page_select.METHOD_*
    timings: dict[str, float]  # the pages' render and encode times; the LLM's are added


def new_timings() -> dict[str, float]:
    """Seconds per stage of one answer, as the record's "timings" holds them."""
    return {"render_s": 0.0, "encode_s": 0.0, "prefill_s": 0.0, "generate_s": 0.0}


class Asker:
    """A loaded model: the vision encoder and the LLM, ready for questions.

    ``token_cache``: visual tokens on disk, so a page already seen is neither rendered nor encoded
    again. ``prefix_store``: the LLM state after [prompt start, page] on disk, so a page already
    asked about is not prefilled again, even by another process. ``reuse_prefix``: also keep the
    last page's state in memory, so a further question on that page decodes only its own text
    (``fila batch`` with several questions).
    """

    def __init__(self, encoder: HybridEncoder, backend: LlamaBackend, template: PromptTemplate, bundle: Bundle,
                 token_cache: TokenCache | None = None, reuse_prefix: bool = False,
                 prefix_store: PrefixStore | None = None):
        if encoder.llm_width != backend.n_embd:
            raise ModelError(
                f"{bundle.vision}: its projector makes {encoder.llm_width}-wide tokens but {bundle.llm} embeds "
                f"{backend.n_embd}-wide: they are not a pair; use the mmproj made for this LLM"
            )
        self.encoder = encoder
        self.backend = backend
        self.template = template
        self.bundle = bundle
        self.token_cache = token_cache
        self.reuse_prefix = reuse_prefix
        self.prefix_store = prefix_store
        self._prefix: tuple[tuple, PrefixState] | None = None  # (key, state) of the last page
        self._weights_identity = (file_identity(bundle.vision), file_identity(bundle.fusion) if bundle.fusion else None)
        self._llm_identity = file_identity(bundle.llm) if prefix_store is not None else None

    @classmethod
    def load(
        cls,
        bundle: Bundle,
        *,
        device: str = "auto",
        dtype: str = "auto",
        n_gpu_layers: int | None = None,
        verbose: bool = False,
        token_cache: TokenCache | None = None,
        reuse_prefix: bool = False,
        prefix_store: PrefixStore | None = None,
        llama_settings: LlamaSettings | None = None,
        compile_encoder: bool = False,
        ctx_size: int | None = None,
        template: str | None = None,
    ) -> Asker:
        """llama_settings: how llama.cpp runs the LLM (default ``LlamaSettings()``); its n_seq_max is
        how many questions ``answer_many`` may answer side by side (each holds a KV cache of the
        bundle's n_ctx). compile_encoder: ``compile_for_inference`` the encoder, which pays off over
        many pages (each new canvas shape compiles once, ~1 min on a 2-core CPU for ViT-L).
        ctx_size, template: ``ModelOptions``'s (a fixed context; the prompt format's name or jinja file)."""
        from fila_cli.vision.devices import pick_device, pick_dtype
        from fila_cli.vision.load import load_encoder

        torch_device = pick_device(device)
        encoder = load_encoder(bundle.vision, bundle.fusion, device=torch_device, dtype=pick_dtype(dtype, torch_device))
        if compile_encoder:
            from fila_cli.vision.model.compiled import compile_for_inference

            compile_for_inference(encoder)
        # An explicit ctx_size stays as set; else the bundle's n_ctx, grown as prompts need.
        backend = LlamaBackend(bundle.llm, n_ctx=ctx_size or bundle.n_ctx, n_gpu_layers=n_gpu_layers, verbose=verbose,
                               lora_path=bundle.lora, settings=llama_settings, grow=ctx_size is None)
        template = select_template(bundle.template, backend.chat_template, backend.model_name, user_choice=template)
        return cls(encoder, backend, template, bundle, token_cache=token_cache, reuse_prefix=reuse_prefix,
                   prefix_store=prefix_store)

    @classmethod
    def from_options(cls, options: ModelOptions, bundle: Bundle | None = None, *, reuse_prefix: bool = False,
                     n_seq_max: int = 1) -> Asker:
        """Load the model ``options`` name (or ``bundle``, when already resolved) as they say, able
        to answer ``n_seq_max`` questions side by side."""
        token_cache, prefix_store = None, None
        if options.use_cache:
            # One cap over both stores: the least recently used entry goes first, whichever store holds it.
            budget = CacheBudget(default_cache_dir(), int(options.cache_max_gb * BYTES_PER_GB))
            token_cache = TokenCache(budget.root, budget)
            prefix_store = PrefixStore(budget.root / PREFIX_DIR_NAME, budget=budget)
        return cls.load(bundle or options.bundle(), device=options.device, dtype=options.dtype,
                        n_gpu_layers=options.gpu_layers, verbose=options.verbose,
                        token_cache=token_cache, reuse_prefix=reuse_prefix, prefix_store=prefix_store,
                        llama_settings=LlamaSettings(n_seq_max=n_seq_max), compile_encoder=options.compile_encoder,
                        ctx_size=options.ctx_size, template=options.template)

    @property
    def model_name(self) -> str:
        return self.bundle.name

    def ask(
        self,
        path: str | Path,
        question: str,
        options: AskOptions | None = None,
        on_text: TextCallback | None = None,
        on_page: PageProgress | None = None,
    ) -> Answer:
        """Open, choose pages, render and answer, all in this process."""
        options = options or AskOptions()
        with open_document(path, password=options.password) as document:
            plan = plan_pages(document, question, options.pages)
            sources = [self.local_page_source(document, index, options) for index in plan.indices]
            sha256 = document.content_hash() if self.caches_on else None
            answer = self.answer_pages(str(path), question, sources, plan.detail, options, sha256, on_text, on_page,
                                       method=plan.method)
            # After rendering (MuPDF reports broken streams then), with what the cached pages' renders said.
            answer.warnings = document_warnings(document, answer.notices)
            return answer

    @property
    def caches_on(self) -> bool:
        """Whether anything is keyed by the document's hash (else it need not be computed)."""
        return self.token_cache is not None or self.prefix_store is not None or self.reuse_prefix

    def local_page_source(self, document: Document, index: int, options: AskOptions) -> PageSource:
        def render() -> RenderedPage:
            started = time.perf_counter()
            image = render_for_canvas(document, index, self.encoder.anyres, self.encoder.highres_scale)
            text = document.page_text(index) if options.text_layer else ""
            return RenderedPage(index, image, text, time.perf_counter() - started, page_notices(document, index))

        return PageSource(index, render, lambda: document.page_text(index))

    def answer_pages(
        self,
        file: str,
        question: str,
        pages: Sequence[PageSource],
        reason: str,
        options: AskOptions,
        document_sha256: str | None = None,
        on_text: TextCallback | None = None,
        on_page: PageProgress | None = None,
        *,
        method: str = METHOD_ALL,
    ) -> Answer:
        """Answer from the given pages: each alone, keeping the most confident answer, or all of
        them in one prompt with ``options.together``."""
        timings = new_timings()
        prepared = self.prepare_pages(file, pages, document_sha256, timings, options.text_layer)
        return self.answer_prepared(file, question, prepared, len(pages), reason, options, timings, on_text, on_page,
                                    method=method)

    def answer_prepared(
        self,
        file: str,
        question: str,
        pages: Iterable[PreparedPage],
        n_pages: int,
        reason: str,
        options: AskOptions,
        timings: dict[str, float],
        on_text: TextCallback | None = None,
        on_page: PageProgress | None = None,
        *,
        method: str = METHOD_ALL,
    ) -> Answer:
        """``answer_pages`` from ``n_pages`` pages made ready by ``prepare_pages``: the LLM's half.

        ``pages`` is drawn one page at a time, as the LLM gets to it: it may be a generator that
        renders and encodes on demand, or pages another thread prepared ahead (``fila batch``).
        ``timings`` is where the pages' render and encode times were added; the LLM's are added too.
        """
        if options.together and n_pages > 1:
            return self._answer_together(file, question, pages, n_pages, reason, options, timings, on_text, on_page,
                                         method)
        answers = []
        notices = ReadNotices()
        upcoming = iter(pages)
        for done in range(n_pages):
            if on_page is not None:
                on_page(done, n_pages)
            # Stream only when one page is read: with several, the best answer is known at the end.
            stream = on_text if n_pages == 1 else None
            answers.append(self._answer_page(next(upcoming), question, options, timings, stream,
                                             persist=n_pages == 1))
            notices = notices.merged(answers[-1].notices)
        if on_page is not None:
            on_page(n_pages, n_pages)
        return self._best_answer(file, question, answers, notices, reason, timings, method)

    def _best_answer(self, file: str, question: str, answers: Sequence[_PageAnswer], notices: ReadNotices, reason: str,
                     timings: dict[str, float], method: str) -> Answer:
        """The most confident of the pages' answers (the only one, for one page)."""
        best = max(answers, key=lambda a: a.mean_logprob)
        if len(answers) > 1:
            reason += f"; page {best.page + 1} gave the most confident answer"
        return Answer(
            file=file,
            question=question,
            answer=best.text.strip(),
            pages=[best.page + 1],
            confidence=_confidence(best.mean_logprob),
            model=self.model_name,
            timings=timings,
            tokens={"visual": best.visual_tokens, "prompt": best.prompt_tokens, "generated": best.generated_tokens},
            page_reason=reason,
            page_method=method,
            notices=notices,
        )

    # -- pages to visual tokens --

    def prepare_page(self, file: str, page: PageSource, document_sha256: str | None,
                     timings: dict[str, float]) -> PreparedPage:
        """Visual tokens of the page, from the cache or rendered and encoded, within the model's limit."""
        key = None
        if document_sha256 is not None:
            key = token_cache_key(document_sha256, page.index, self.encoder.anyres, DEFAULT_MAX_PIXELS, *self._weights_identity,
                                  dtype=str(self.encoder.dtype).removeprefix("torch."), device=self.encoder.device.type,
                                  highres_scale=self.encoder.highres_scale)
        encoded, text, notices = self._encoded_page(page, key, timings)
        if encoded.n_tokens > self.bundle.max_visual_tokens:
            raise ModelError(
                f"{file}: page {page.index + 1} makes {encoded.n_tokens} visual tokens, over the model's limit of "
                f"{self.bundle.max_visual_tokens}; raise max_visual_tokens in the bundle"
            )
        return PreparedPage(page.index, encoded.tokens.numpy().astype(np.float32, copy=False), key, text, notices)

    def prepare_pages(self, file: str, pages: Sequence[PageSource], document_sha256: str | None,
                      timings: dict[str, float], text_layer: bool) -> Iterator[PreparedPage]:
        """The pages' visual tokens, one page at a time, rendered and encoded as each is drawn (the
        vision half of ``answer_pages``). With ``text_layer`` each page's text layer comes along,
        read here even for a cached page, so the LLM's half never goes back to the document."""
        for page in pages:
            prepared = self.prepare_page(file, page, document_sha256, timings)
            if text_layer and prepared.text is None:
                prepared.text = page.text()
            yield prepared

    def _encoded_page(self, page: PageSource, key: str | None,
                      timings: dict[str, float]) -> tuple[EncodedPage, str | None, ReadNotices]:
        """Visual tokens of the page, from the cache or rendered and encoded; plus the rendered text
        layer and what MuPDF said rendering the page (now, or when its tokens were cached)."""
        if self.token_cache is not None and key is not None:
            cached = self.token_cache.get(key)
            if cached is not None:
                return cached.page, None, cached.notices
        rendered = page.render()
        timings["render_s"] += rendered.render_s
        started = time.perf_counter()
        encoded = self.encoder.encode(rendered.image)
        timings["encode_s"] += time.perf_counter() - started
        if self.token_cache is not None and key is not None:
            self.token_cache.put(key, encoded, rendered.notices)
        return encoded, rendered.text, rendered.notices

    def with_text_layer(self, question: str, pages: Sequence[PreparedPage]) -> str:
        """``question`` after the pages' text layers (--text-layer), each cut to MAX_TEXT_LAYER_CHARS."""
        texts = []
        for page in pages:
            text = " ".join((page.text or "").split())[:MAX_TEXT_LAYER_CHARS]
            if text:
                texts.append(text if len(pages) == 1 else f"(page {page.index + 1}) {text}")
        return f"Text of the page: {' '.join(texts)}\n\n{question}" if texts else question

    # -- one page, or several together --

    def _answer_page(self, prepared: PreparedPage, question: str, options: AskOptions, timings: dict[str, float],
                     on_text: TextCallback | None, *, persist: bool = True) -> _PageAnswer:
        before, after = self._page_prompt(question, prepared, options)
        generation = self._generate([before, prepared.visual], after, options, [prepared], on_text, persist=persist)
        return _page_answer(prepared, generation, timings)

    def _page_prompt(self, question: str, prepared: PreparedPage, options: AskOptions) -> tuple[str, str]:
        """(before, after): the text around one page's visual tokens."""
        if options.text_layer:
            question = self.with_text_layer(question, [prepared])
        return self.template.render(question)

    def together_segments(self, before: str, prepared: Sequence[PreparedPage]) -> list:
        """[before, label, page, label, page, ...]: each page introduced by its number."""
        segments: list = [before]
        for position, page in enumerate(prepared):
            segments += [page_label(page.index, position == 0), page.visual]
        return segments

    def check_together_fits(self, file: str, segments: Sequence, after: str) -> tuple[int, int]:
        """(visual tokens, text tokens) of a several-page prompt; ContextOverflowError when it cannot fit."""
        n_visual = sum(len(s) for s in segments if not isinstance(s, str))
        n_text = sum(len(self.backend.tokenize(s, at_start=i == 0)) for i, s in enumerate(segments) if isinstance(s, str))
        n_text += len(self.backend.tokenize(after))
        n_pages = len(segments) // 2
        what = "the page needs" if n_pages <= 1 else f"{n_pages} pages together need"
        if not self.backend.ensure_context(n_visual + n_text + 1):  # + 1: room for at least one answer token
            advice = "ask about fewer pages, or drop --together to read them one by one" if n_pages > 1 else None
            raise self.backend.overflow(n_visual + n_text, f"{file}: {what}", f"{n_visual} visual + {n_text} text",
                                        advice)
        return n_visual, n_text

    def _answer_together(self, file: str, question: str, pages: Iterable[PreparedPage], n_pages: int, reason: str,
                         options: AskOptions, timings: dict[str, float], on_text: TextCallback | None,
                         on_page: PageProgress | None, method: str) -> Answer:
        prepared = []
        upcoming = iter(pages)
        for done in range(n_pages):
            if on_page is not None:
                on_page(done, n_pages)
            prepared.append(next(upcoming))
        if on_page is not None:
            on_page(n_pages, n_pages)
        segments, after = self._together_prompt(question, prepared, options)
        n_visual, _ = self.check_together_fits(file, segments, after)
        generation = self._generate(segments, after, options, prepared, on_text)
        return self._together_answer(file, question, prepared, generation, n_visual, reason, timings, method)

    def _together_prompt(self, question: str, prepared: Sequence[PreparedPage], options: AskOptions) -> tuple[list, str]:
        """([before, label, page, label, page, ...], after): several pages in one prompt."""
        question_text = self.with_text_layer(question, prepared) if options.text_layer else question
        before, after = self.template.render(question_text)
        return self.together_segments(before, prepared), after

    def _together_answer(self, file: str, question: str, prepared: Sequence[PreparedPage], generation: Generation,
                         n_visual: int, reason: str, timings: dict[str, float], method: str) -> Answer:
        timings["prefill_s"] += generation.prefill_s
        timings["generate_s"] += generation.generate_s
        numbers = ", ".join(str(p.index + 1) for p in prepared)
        return Answer(
            file=file,
            question=question,
            answer=generation.text.strip(),
            pages=[p.index + 1 for p in prepared],
            confidence=_confidence(generation.mean_logprob),
            model=self.model_name,
            timings=timings,
            tokens={"visual": n_visual, "prompt": generation.n_prompt_tokens, "generated": generation.n_generated},
            page_reason=f"{reason}; pages {numbers} read together in one prompt ({n_visual} visual tokens)",
            page_method=method,
            notices=ReadNotices().merged(*(p.notices for p in prepared)),
        )

    # -- several questions of one prompt each, side by side (fila batch --parallel) --

    def one_prompt(self, asked: OnePromptQuestion, options: AskOptions) -> list:
        """``asked``'s whole prompt, as ``answer_prepared`` decodes it: [before, page, after], or with
        --together [before, label, page, ..., after]."""
        if len(asked.pages) > 1:
            if not options.together:
                raise ValueError("several pages make one prompt only with --together")
            segments, after = self._together_prompt(asked.question, asked.pages, options)
            return [*segments, after]
        before, after = self._page_prompt(asked.question, asked.pages[0], options)
        return [before, asked.pages[0].visual, after]

    def fits_one_prompt(self, asked: OnePromptQuestion, options: AskOptions) -> bool:
        """Whether ``asked``'s prompt fits the LLM's context (per sequence); when it does not,
        ``answer_prepared`` is the one to say why, in its own words."""
        prompt = self.one_prompt(asked, options)
        if len(asked.pages) > 1:
            try:
                self.check_together_fits(asked.file, prompt[:-1], prompt[-1])
            except ContextOverflowError:
                return False
            return True
        return self.backend.ensure_context(self.backend.prompt_size(prompt))

    def answer_many(self, questions: Sequence[OnePromptQuestion], options: AskOptions) -> list[Answer]:
        """Answer up to ``backend.n_seq_max`` questions of one prompt each side by side
        (``LlamaBackend.generate_many``), one ``Answer`` each as ``answer_prepared`` makes it: the same
        answer for greedy decoding (``generate_many`` says when a token could differ), the
        confidence within float rounding, the LLM's times as ``generate_many`` defines them.

        Each prompt must fit (``fits_one_prompt``), else ContextOverflowError for the group. No prefix
        state is read or kept: batch documents are new, and each prompt is decoded whole.
        """
        prompts = [self.one_prompt(asked, options) for asked in questions]
        generations = self.backend.generate_many(prompts, options.sampling)
        answers = []
        for asked, generation in zip(questions, generations):
            if len(asked.pages) > 1:
                answers.append(self._together_answer(asked.file, asked.question, asked.pages, generation,
                                                     generation.n_visual_tokens, asked.reason, asked.timings, asked.method))
            else:
                page = _page_answer(asked.pages[0], generation, asked.timings)
                answers.append(self._best_answer(asked.file, asked.question, [page], ReadNotices().merged(page.notices),
                                                 asked.reason, asked.timings, asked.method))
        return answers

    # -- the LLM, with the prefix [prompt start, pages] reused when it can be --

    def prefix_key(self, prefix: Sequence, prepared: Sequence[PreparedPage]) -> str | None:
        """The prefix store's key for [prompt start, pages]; None when a page has no cache key."""
        if self._llm_identity is None or any(p.visual_key is None for p in prepared):
            return None
        return prefix_cache_key(self._llm_identity, self.backend.n_ctx, [p.visual_key for p in prepared],
                                [s for s in prefix if isinstance(s, str)], flash_attn=self.backend.settings.flash_attn,
                                n_seq_max=self.backend.n_seq_max)

    def prefix_state(self, prefix: Sequence, prepared: Sequence[PreparedPage], *,
                     persist: bool = True) -> tuple[PrefixState, float]:
        """The LLM state after ``prefix``, from memory, from disk, or decoded (then kept, on disk only
        with ``persist``); and the seconds it took."""
        started = time.perf_counter()
        memory_key = (tuple(p.visual_key for p in prepared), tuple(s for s in prefix if isinstance(s, str)))
        if self._prefix is not None and self._prefix[0] == memory_key:
            return self._prefix[1], 0.0
        self._prefix = None  # free the previous page's state before making the next
        disk_key = self.prefix_key(prefix, prepared)
        state = None
        if disk_key is not None and self.prefix_store is not None:
            state = self.prefix_store.get(disk_key, self.backend)
        if state is None:
            self.backend.prefill(prefix)
            state = self.backend.save_state()
            if persist and disk_key is not None and self.prefix_store is not None:
                self.prefix_store.put(disk_key, state)
        if self.reuse_prefix:
            self._prefix = (memory_key, state)
        return state, time.perf_counter() - started

    def _generate(self, prefix: list, after: str, options: AskOptions, prepared: Sequence[PreparedPage],
                  on_text: TextCallback | None, *, persist: bool = True):
        """``_generate_once``; a stored state llama.cpp refuses (another build or setting wrote it) is
        dropped and the prefix decoded again, as a damaged entry is."""
        try:
            return self._generate_once(prefix, after, options, prepared, on_text, persist=persist)
        except StateRefusedError:
            key = self.prefix_key(prefix, prepared)
            if key is None or self.prefix_store is None:
                raise
            self.prefix_store.discard(key)
            self._prefix = None
            return self._generate_once(prefix, after, options, prepared, on_text, persist=persist)

    def _generate_once(self, prefix: list, after: str, options: AskOptions, prepared: Sequence[PreparedPage],
                       on_text: TextCallback | None, *, persist: bool = True):
        """[prefix, after] through the LLM; the prefix's state is reused in memory or on disk when it can be.

        ``persist``: write a newly decoded prefix to the store. Off while a scan is read page by page:
        twenty pages' states (up to a GB each for a 7B model) would cost more to write than they save.
        """
        keyed = all(p.visual_key is not None for p in prepared)
        if not keyed or (not self.reuse_prefix and self.prefix_store is None):
            return self.backend.generate([*prefix, after], options.sampling, on_text=on_text)
        if not self.reuse_prefix and not persist:  # nothing to keep: use a stored state, else decode it all
            started = time.perf_counter()
            key = self.prefix_key(prefix, prepared)
            state = self.prefix_store.get(key, self.backend) if key is not None and self.prefix_store else None
            load_s = time.perf_counter() - started
            if state is None:
                return self.backend.generate([*prefix, after], options.sampling, on_text=on_text)
            generation = self.backend.generate_from_state(state, [after], options.sampling, on_text=on_text)
            generation.prefill_s += load_s
            return generation
        state, prefix_s = self.prefix_state(prefix, prepared, persist=persist)
        generation = self.backend.generate_from_state(state, [after], options.sampling, on_text=on_text)
        generation.prefill_s += prefix_s
        return generation


def _page_answer(prepared: PreparedPage, generation: Generation, timings: dict[str, float]) -> _PageAnswer:
    timings["prefill_s"] += generation.prefill_s
    timings["generate_s"] += generation.generate_s
    return _PageAnswer(prepared.index, generation.text, generation.mean_logprob, len(prepared.visual),
                       generation.n_prompt_tokens, generation.n_generated, prepared.notices)


def _confidence(mean_logprob: float) -> float | None:
    return math.exp(mean_logprob) if math.isfinite(mean_logprob) else None
