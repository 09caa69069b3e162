"""The text around the visual tokens: one page's prompt, several pages' (--together), the text
layer (--text-layer), a chat's turns, and whether a prompt fits the LLM's context.

A prompt is a list of segments, text (str) and visual tokens (array), as ``LlamaBackend`` decodes
it: ``[before, page, after]``, or ``[before, label, page, label, page, ..., after]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fila_cli.llm import ContextOverflowError
from fila_cli.llm.templates import PromptTemplate
from fila_cli.qa.pages import PreparedPage

# The page's text layer, when --text-layer asks for it, is cut to this many characters so that it
# cannot crowd the image out of the context.
MAX_TEXT_LAYER_CHARS = 4000


def page_label(index: int, first: bool) -> str:
    """The text that introduces a page's visual tokens when several pages share one prompt."""
    return ("" if first else "\n") + f"Page {index + 1}:\n"


def with_text_layer(question: str, pages: Sequence[PreparedPage]) -> str:
    """``question`` after the pages' text layers (--text-layer), each cut to MAX_TEXT_LAYER_CHARS."""
    texts = []
    for page in pages:
        text = " ".join((page.text or "").split())[:MAX_TEXT_LAYER_CHARS]
        if text:
            texts.append(text if len(pages) == 1 else f"(page {page.index + 1}) {text}")
    return f"Text of the page: {' '.join(texts)}\n\n{question}" if texts else question


class PromptBuilder:
    """Prompts in the model's chat template, measured with its tokenizer (``backend``)."""

    def __init__(self, template: PromptTemplate, backend):
        self.template = template
        self.backend = backend

    def question_text(self, question: str, pages: Sequence[PreparedPage], text_layer: bool) -> str:
        return with_text_layer(question, pages) if text_layer else question

    def pages_segments(self, before: str, pages: Sequence[PreparedPage]) -> list:
        """[before, page] for one page; [before, label, page, label, page, ...] for several, each
        introduced by its number."""
        if len(pages) == 1:
            return [before, pages[0].visual]
        segments: list = [before]
        for position, page in enumerate(pages):
            segments += [page_label(page.index, position == 0), page.visual]
        return segments

    def prompt(self, question: str, pages: Sequence[PreparedPage], text_layer: bool) -> tuple[list, str]:
        """(prefix, after): the pages with the text before them, and the question's text after them."""
        before, after = self.template.render(self.question_text(question, pages, text_layer))
        return self.pages_segments(before, pages), after

    def check_fits(self, file: str, segments: Sequence, after: str, *, hint: str = "drop --together to read them "
                   "one by one") -> tuple[int, int]:
        """(visual tokens, text tokens) of a prompt; ContextOverflowError, with the numbers, when it
        cannot fit with room for one answer token. ``hint``: what else to do, for several pages."""
        n_visual = sum(len(s) for s in segments if not isinstance(s, str))
        n_text = sum(len(self.backend.tokenize(s, at_start=i == 0)) for i, s in enumerate(segments) if isinstance(s, str))
        n_text += len(self.backend.tokenize(after))
        n_pages = len(segments) // 2
        what = "the page needs" if n_pages <= 1 else f"{n_pages} pages together need"
        # The context grows to fit when it may (up to the trained context and memory); + 1: room for
        # at least one answer token.
        if not self.backend.ensure_context(n_visual + n_text + 1):
            advice = f"ask about fewer pages, or {hint}" if n_pages > 1 else None
            raise self.backend.overflow(n_visual + n_text, f"{file}: {what}", f"{n_visual} visual + {n_text} text",
                                        advice)
        return n_visual, n_text

    def fits(self, file: str, prefix: list, after: str) -> bool:
        """Whether [prefix, after] fits the LLM's context (per sequence)."""
        if len(prefix) > 2:  # several pages: counted as ``check_fits`` counts them
            try:
                self.check_fits(file, prefix, after)
            except ContextOverflowError:
                return False
            return True
        return self.backend.ensure_context(self.backend.prompt_size([*prefix, after]))

    # -- a chat's turns, after the pages --

    def prompt_start(self) -> str:
        """The text before the pages (the template's, which does not depend on the question)."""
        return self.template.render("")[0]

    def first_turn(self, question: str, pages: Sequence[PreparedPage], text_layer: bool) -> str:
        """The first turn's text after the pages: ``fila ask``'s, with the text layer under --text-layer."""
        return self.template.render(self.question_text(question, pages, text_layer))[1]

    def follow_up(self, question: str, eos_text: str) -> str:
        """A later turn's text after the previous answer."""
        return self.template.render_follow_up(question, eos_text)
