"""Answering a question about a document: pages in, visual tokens, LLM answer out.

    from fila_cli.qa.ask import Asker, AskOptions
    asker = Asker.load(resolve_bundle("llava-1.6-mistral-7b"))
    answer = asker.ask("report.pdf", "What is the total due?")
    print(answer.answer, answer.pages)

The model (vision encoder + LLM) loads once per ``Asker``; ``fila batch`` reuses one for every
document. ``Asker`` puts together the jobs that live in their own modules:

- ``pages``: render and encode a page, through the token cache (``PagePreparer``);
- ``prompts``: the text around the visual tokens, and whether it fits (``PromptBuilder``);
- ``prefix``: the LLM state after [prompt start, pages], reused (``PrefixReuse``);
- ``choice``: the most confident page's answer, when pages are read one by one;
- ``records``: the answer (``Answer``) and its JSON record; ``timings``: where its time went.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fila_cli.bundles.bundle import Bundle
from fila_cli.caches.budget import BYTES_PER_GB
from fila_cli.caches.folder import CacheFolder
from fila_cli.documents.document import Document, open_document
from fila_cli.documents.notices import ReadNotices, document_warnings
from fila_cli.documents.page_select import METHOD_ALL, plan_pages
from fila_cli.errors import ModelError
from fila_cli.llm import Generation, LlamaBackend, LlamaSettings
from fila_cli.llm.prefix_store import PrefixStore
from fila_cli.llm.templates import PromptTemplate, select_template
from fila_cli.qa.answer_evidence import locate_on_document
from fila_cli.qa.choice import PageAnswer, best_page, confidence
from fila_cli.qa.options import AskOptions, ModelOptions
from fila_cli.qa.pages import PagePreparer, PageSource, PreparedPage
from fila_cli.qa.prefix import PrefixReuse
from fila_cli.qa.prompts import MAX_TEXT_LAYER_CHARS, PromptBuilder, page_label
from fila_cli.qa.records import Answer
from fila_cli.qa.timings import Timings
from fila_cli.vision.model.encoder import HybridEncoder
from fila_cli.vision.token_cache import TokenCache

__all__ = ["MAX_TEXT_LAYER_CHARS", "Answer", "AskOptions", "Asker", "OnePromptQuestion", "PageSource", "PreparedPage",
           "Timings", "new_timings", "page_label"]

TextCallback = Callable[[str], None]
# Called with (pages done, pages in all) while several pages are read one after another.
PageProgress = Callable[[int, int], None]

# Kept for callers of the earlier dict: a fresh ``Timings``.
new_timings = Timings


@dataclass
class OnePromptQuestion:
    """A question one prompt answers: about one page, or several pages read together (--together);
    what ``Asker.answer_many`` takes."""

    file: str
    question: str
    pages: list[PreparedPage]
    reason: str  # why these pages (page_choice.detail)
    method: str  # page_select.METHOD_*
    timings: Timings  # the pages' render and encode times; the LLM's are added


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
        self.pages = PagePreparer(encoder, bundle, token_cache)
        self.prompts = PromptBuilder(template, backend)
        self.prefix = PrefixReuse(backend, bundle.llm, prefix_store, reuse_prefix, lora_path=bundle.lora)

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
            folder = CacheFolder(max_bytes=int(options.cache_max_gb * BYTES_PER_GB))
            token_cache, prefix_store = TokenCache(folder), PrefixStore(folder)
        return cls.load(bundle or options.bundle(), device=options.device, dtype=options.dtype,
                        n_gpu_layers=options.gpu_layers, verbose=options.verbose,
                        token_cache=token_cache, reuse_prefix=reuse_prefix, prefix_store=prefix_store,
                        llama_settings=LlamaSettings(n_seq_max=n_seq_max), compile_encoder=options.compile_encoder,
                        ctx_size=options.ctx_size, template=options.template)

    # -- facts --

    @property
    def model_name(self) -> str:
        return self.bundle.name

    @property
    def token_cache(self) -> TokenCache | None:
        return self.pages.token_cache

    @token_cache.setter
    def token_cache(self, cache: TokenCache | None) -> None:  # e.g. eval's in-memory RecentPages
        self.pages.token_cache = cache

    @property
    def prefix_store(self) -> PrefixStore | None:
        return self.prefix.store

    @prefix_store.setter
    def prefix_store(self, store: PrefixStore | None) -> None:
        self.prefix.store = store

    @property
    def fusion(self) -> bool:
        """Whether FILA fusion is on (the ConvNeXt branch reads the page uncut by crops)."""
        return self.encoder.highres_scale is not None

    @property
    def caches_on(self) -> bool:
        """Whether anything is keyed by the document's hash (else it need not be computed)."""
        return self.token_cache is not None or self.prefix_store is not None or self.prefix.reuse_prefix

    def close(self) -> None:
        """Free the LLM's memory (llama.cpp's context and weights)."""
        self.backend.close()

    def __enter__(self) -> Asker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- a document, all in this process --

    def ask(
        self,
        path: str | Path,
        question: str,
        options: AskOptions | None = None,
        on_text: TextCallback | None = None,
        on_page: PageProgress | None = None,
    ) -> Answer:
        """Open, choose pages, render and answer, all in this process; then locate the answer on
        the pages it came from (``answer.evidence``)."""
        options = options or AskOptions()
        with open_document(path, password=options.password) as document:
            plan = plan_pages(document, question, options.pages)
            sources = [self.local_page_source(document, index, options) for index in plan.indices]
            sha256 = document.content_hash() if self.caches_on else None
            answer = self.answer_pages(str(path), question, sources, plan.detail, options, sha256, on_text, on_page,
                                       method=plan.method)
            answer.evidence = locate_on_document(document, answer.pages, answer.answer, self.encoder.anyres,
                                                 ocr=options.evidence_ocr)
            # After rendering (MuPDF reports broken streams then), with what the cached pages' renders said.
            answer.warnings = document_warnings(document, answer.notices)
            return answer

    def local_page_source(self, document: Document, index: int, options: AskOptions) -> PageSource:
        return self.pages.local_source(document, index, options.text_layer)

    def prepare_page(self, file: str, page: PageSource, document_sha256: str | None, timings: Timings) -> PreparedPage:
        return self.pages.prepare_page(file, page, document_sha256, timings)

    def prepare_pages(self, file: str, pages: Sequence[PageSource], document_sha256: str | None,
                      timings: Timings, text_layer: bool) -> Iterator[PreparedPage]:
        return self.pages.prepare_pages(file, pages, document_sha256, timings, text_layer)

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
        timings = Timings()
        prepared = self.pages.prepare_pages(file, pages, document_sha256, timings, options.text_layer)
        return self.answer_prepared(file, question, prepared, len(pages), reason, options, timings, on_text, on_page,
                                    method=method)

    # -- the LLM's half: pages made ready, answered --

    def answer_prepared(
        self,
        file: str,
        question: str,
        pages: Iterable[PreparedPage],
        n_pages: int,
        reason: str,
        options: AskOptions,
        timings: Timings,
        on_text: TextCallback | None = None,
        on_page: PageProgress | None = None,
        *,
        method: str = METHOD_ALL,
    ) -> Answer:
        """``answer_pages`` from ``n_pages`` pages made ready by ``prepare_pages``.

        ``pages`` is drawn one page at a time, as the LLM gets to it: it may be a generator that
        renders and encodes on demand, or pages another thread prepared ahead (``fila batch``).
        ``timings`` is where the pages' render and encode times were added; the LLM's are added too.
        """
        drawn = _Drawn(pages, n_pages, on_page)
        if options.together and n_pages > 1:
            asked = OnePromptQuestion(file, question, list(drawn), reason, method, timings)
            prefix, after = self.prompts.prompt(question, asked.pages, options.text_layer)
            n_visual, _ = self.prompts.check_fits(file, prefix, after)
            generation = self.prefix.generate(prefix, after, options.sampling, asked.pages, on_text)
            return self._together_answer(asked, generation, n_visual)
        answers = []
        for page in drawn:
            prefix, after = self.prompts.prompt(question, [page], options.text_layer)
            # Stream only when one page is read: with several, the best answer is known at the end.
            # Keep a page's state on disk only then: a scan's twenty states would cost more than they save.
            generation = self.prefix.generate(prefix, after, options.sampling, [page],
                                              on_text if n_pages == 1 else None, persist=n_pages == 1)
            answers.append(self._page_answer(page, generation, timings))
        return self._best_answer(OnePromptQuestion(file, question, [], reason, method, timings), answers)

    def _page_answer(self, page: PreparedPage, generation: Generation, timings: Timings) -> PageAnswer:
        timings.add_llm(generation.prefill_s, generation.generate_s)
        return PageAnswer.of(page.index, len(page.visual), generation, page.notices)

    def _best_answer(self, asked: OnePromptQuestion, answers: Sequence[PageAnswer]) -> Answer:
        """The most confident of the pages' answers (the only one, for one page)."""
        best, reason = best_page(answers, asked.reason)
        return Answer(file=asked.file, question=asked.question, answer=best.text.strip(), pages=[best.page + 1],
                      confidence=confidence(best.mean_logprob), model=self.model_name, timings=asked.timings,
                      tokens=best.tokens, page_reason=reason, page_method=asked.method,
                      notices=ReadNotices().merged(*(a.notices for a in answers)))

    def _together_answer(self, asked: OnePromptQuestion, generation: Generation, n_visual: int) -> Answer:
        asked.timings.add_llm(generation.prefill_s, generation.generate_s)
        numbers = ", ".join(str(p.index + 1) for p in asked.pages)
        return Answer(
            file=asked.file,
            question=asked.question,
            answer=generation.text.strip(),
            pages=[p.index + 1 for p in asked.pages],
            confidence=confidence(generation.mean_logprob),
            model=self.model_name,
            timings=asked.timings,
            tokens={"visual": n_visual, "prompt": generation.n_prompt_tokens, "generated": generation.n_generated},
            page_reason=f"{asked.reason}; pages {numbers} read together in one prompt ({n_visual} visual tokens)",
            page_method=asked.method,
            notices=ReadNotices().merged(*(p.notices for p in asked.pages)),
        )

    # -- several questions of one prompt each, side by side (fila batch --parallel) --

    def one_prompt(self, asked: OnePromptQuestion, options: AskOptions) -> list:
        """``asked``'s whole prompt, as ``answer_prepared`` decodes it: [before, page, after], or with
        --together [before, label, page, ..., after]."""
        if len(asked.pages) > 1 and not options.together:
            raise ValueError("several pages make one prompt only with --together")
        prefix, after = self.prompts.prompt(asked.question, asked.pages, options.text_layer)
        return [*prefix, after]

    def fits_one_prompt(self, asked: OnePromptQuestion, options: AskOptions) -> bool:
        """Whether ``asked``'s prompt fits the LLM's context (per sequence); when it does not,
        ``answer_prepared`` is the one to say why, in its own words."""
        prompt = self.one_prompt(asked, options)
        return self.prompts.fits(asked.file, prompt[:-1], prompt[-1])

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
                answers.append(self._together_answer(asked, generation, generation.n_visual_tokens))
            else:
                answers.append(self._best_answer(asked, [self._page_answer(asked.pages[0], generation, asked.timings)]))
        return answers


class _Drawn:
    """``n_pages`` pages drawn one at a time from ``pages``, saying the progress to ``on_page``."""

    def __init__(self, pages: Iterable[PreparedPage], n_pages: int, on_page: PageProgress | None):
        self._pages, self.n_pages, self._on_page = pages, n_pages, on_page

    def __iter__(self) -> Iterator[PreparedPage]:
        upcoming = iter(self._pages)
        for done in range(self.n_pages):
            if self._on_page is not None:
                self._on_page(done, self.n_pages)
            yield next(upcoming)
        if self._on_page is not None:
            self._on_page(self.n_pages, self.n_pages)
