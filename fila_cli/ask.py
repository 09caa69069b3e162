"""Answering a question about a document: pages in, visual tokens, LLM answer out.

    from fila_cli.ask import Asker, AskOptions
    asker = Asker.load(resolve_bundle("llava-1.6-mistral-7b"))
    answer = asker.ask("report.pdf", "What is the total due?")
    print(answer.answer, answer.pages)

The model (vision encoder + LLM) loads once per ``Asker``; ``fila batch`` reuses one for every
document.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from .bundles import Bundle
from .documents import Document, open_document, parse_page_spec
from .errors import ModelError
from .llm import LlamaBackend, SamplingParams
from .llm.templates import PromptTemplate, select_template
from .model.encoder import HybridEncoder
from .page_select import choose_pages
from .render import render_for_canvas

TextCallback = Callable[[str], None]
# Called with (pages done, pages in all) while several pages are read one after another.
PageProgress = Callable[[int, int], None]

# The page's text layer, when --text-layer asks for it, is cut to this many characters so that it
# cannot crowd the image out of the context.
MAX_TEXT_LAYER_CHARS = 4000


@dataclass
class AskOptions:
    pages: str | None = None  # "1,3-5", 1-based; None: fila chooses
    password: str | None = None
    text_layer: bool = False  # add the page's text layer to the prompt (off: the paper's model)
    sampling: SamplingParams = field(default_factory=SamplingParams)


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
    page_reason: str = ""

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
        }


@dataclass
class RenderedPage:
    index: int  # 0-based
    image: Image.Image
    text: str  # the text layer, when --text-layer asked for it
    render_s: float


@dataclass
class _PageAnswer:
    page: int  # 0-based
    text: str
    mean_logprob: float
    visual_tokens: int
    prompt_tokens: int
    generated_tokens: int


def choose_page_indices(document: Document, question: str, pages: str | None) -> tuple[list[int], str]:
    """0-based pages to read and why."""
    if pages is not None:
        chosen = parse_page_spec(pages, document.page_count, name=document.path)
        return chosen, "pages given with --pages"
    if document.page_count == 1:
        return [0], "the document has one page"
    choice = choose_pages(question, [document.page_text(i) for i in range(document.page_count)])
    return list(choice.pages), choice.reason


class Asker:
    """A loaded model: the vision encoder and the LLM, ready for questions."""

    def __init__(self, encoder: HybridEncoder, backend: LlamaBackend, template: PromptTemplate, bundle: Bundle):
        if encoder.llm_width != backend.n_embd:
            raise ModelError(
                f"{bundle.vision}: its projector makes {encoder.llm_width}-wide tokens but {bundle.llm} embeds "
                f"{backend.n_embd}-wide: they are not a pair; use the mmproj made for this LLM"
            )
        self.encoder = encoder
        self.backend = backend
        self.template = template
        self.bundle = bundle

    @classmethod
    def load(
        cls,
        bundle: Bundle,
        *,
        device: str = "auto",
        dtype: str = "auto",
        n_gpu_layers: int | None = None,
        verbose: bool = False,
    ) -> "Asker":
        from .devices import pick_device, pick_dtype
        from .vision import load_encoder

        torch_device = pick_device(device)
        encoder = load_encoder(bundle.vision, bundle.fusion, device=torch_device, dtype=pick_dtype(dtype, torch_device))
        backend = LlamaBackend(bundle.llm, n_ctx=bundle.n_ctx, n_gpu_layers=n_gpu_layers, verbose=verbose)
        template = select_template(bundle.template, backend.chat_template, backend.model_name)
        return cls(encoder, backend, template, bundle)

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
            indices, reason = choose_page_indices(document, question, options.pages)

            def pages():
                for index in indices:
                    started = time.perf_counter()
                    image = render_for_canvas(document, index, self.encoder.anyres)
                    text = document.page_text(index) if options.text_layer else ""
                    yield RenderedPage(index, image, text, time.perf_counter() - started)

            return self.answer_pages(str(path), question, pages(), len(indices), reason, options, on_text, on_page)

    def answer_pages(
        self,
        file: str,
        question: str,
        pages: Iterable[RenderedPage],
        n_pages: int,
        reason: str,
        options: AskOptions,
        on_text: TextCallback | None = None,
        on_page: PageProgress | None = None,
    ) -> Answer:
        """Answer from pages rendered elsewhere (``fila batch`` renders in an isolated process)."""
        timings = {"render_s": 0.0, "encode_s": 0.0, "prefill_s": 0.0, "generate_s": 0.0}
        answers = []
        for done, page in enumerate(pages):
            if on_page is not None:
                on_page(done, n_pages)
            timings["render_s"] += page.render_s
            # Stream only when one page is read: with several, the best answer is known at the end.
            answers.append(self._answer_page(file, page, question, options, timings, on_text if n_pages == 1 else None))
        if on_page is not None:
            on_page(n_pages, n_pages)
        best = max(answers, key=lambda a: a.mean_logprob)
        if n_pages > 1:
            reason += f"; page {best.page + 1} gave the most confident answer"
        return Answer(
            file=file,
            question=question,
            answer=best.text.strip(),
            pages=[best.page + 1],
            confidence=math.exp(best.mean_logprob) if math.isfinite(best.mean_logprob) else None,
            model=self.model_name,
            timings=timings,
            tokens={"visual": best.visual_tokens, "prompt": best.prompt_tokens, "generated": best.generated_tokens},
            page_reason=reason,
        )

    @staticmethod
    def _question_text(page: RenderedPage, question: str, options: AskOptions) -> str:
        if not options.text_layer:
            return question
        text = " ".join(page.text.split())[:MAX_TEXT_LAYER_CHARS]
        return f"Text of the page: {text}\n\n{question}" if text else question

    def _answer_page(self, file: str, page: RenderedPage, question: str, options: AskOptions,
                     timings: dict[str, float], on_text: TextCallback | None) -> _PageAnswer:
        started = time.perf_counter()
        encoded = self.encoder.encode(page.image)
        timings["encode_s"] += time.perf_counter() - started
        if encoded.n_tokens > self.bundle.max_visual_tokens:
            raise ModelError(
                f"{file}: page {page.index + 1} makes {encoded.n_tokens} visual tokens, over the model's limit of "
                f"{self.bundle.max_visual_tokens}; raise max_visual_tokens in the bundle"
            )
        before, after = self.template.render(self._question_text(page, question, options))
        visual = encoded.tokens.numpy().astype(np.float32, copy=False)
        generation = self.backend.generate([before, visual, after], options.sampling, on_text=on_text)
        timings["prefill_s"] += generation.prefill_s
        timings["generate_s"] += generation.generate_s
        return _PageAnswer(page.index, generation.text, generation.mean_logprob, encoded.n_tokens,
                           generation.n_prompt_tokens, generation.n_generated)
