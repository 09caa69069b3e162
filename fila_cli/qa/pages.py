"""Pages to visual tokens: render and encode a page, or take its tokens from the token cache.

The token cache's key holds everything the tokens depend on: the document's bytes (sha256), the
page, the canvas settings, the weights, the encoder's dtype and device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from fila_cli.bundles.bundle import Bundle
from fila_cli.documents.document import DEFAULT_MAX_PIXELS, Document
from fila_cli.documents.notices import ReadNotices, page_notices
from fila_cli.documents.render import RenderedPage, render_for_canvas
from fila_cli.errors import ModelError
from fila_cli.qa.timings import Timings
from fila_cli.vision.loaders.identity import file_identity
from fila_cli.vision.model.encoder import EncodedPage, HybridEncoder
from fila_cli.vision.token_cache import CachedPage, TokenCache, token_cache_key


@dataclass
class PageSource:
    """A page that is rendered only if its visual tokens are not cached."""

    index: int  # 0-based
    render: Callable[[], RenderedPage]
    text: Callable[[], str]  # the text layer alone (cheap), for --text-layer on a cached page


@dataclass
class PreparedPage:
    """A page's visual tokens, ready for a prompt, and what they are keyed by."""

    index: int  # 0-based
    visual: np.ndarray  # [n_tokens, llm width] float32
    visual_key: str | None  # the token cache's key (None without a document hash)
    text: str | None  # the text layer: rendered with the page, or read by prepare_pages with --text-layer
    notices: ReadNotices = field(default_factory=ReadNotices)  # what MuPDF said rendering it (now or when cached)


class PagePreparer:
    """The vision half of an answer: ``PageSource`` in, ``PreparedPage`` out, through the token cache."""

    def __init__(self, encoder: HybridEncoder, bundle: Bundle, token_cache: TokenCache | None = None):
        self.encoder = encoder
        self.bundle = bundle
        self.token_cache = token_cache
        self._weights_identity = (file_identity(bundle.vision), file_identity(bundle.fusion) if bundle.fusion else None)

    def local_source(self, document: Document, index: int, text_layer: bool) -> PageSource:
        """Page ``index`` of a document open in this process."""
        def render() -> RenderedPage:
            started = time.perf_counter()
            image = render_for_canvas(document, index, self.encoder.anyres, self.encoder.highres_scale)
            text = document.page_text(index) if text_layer else ""
            return RenderedPage(index, image, text, time.perf_counter() - started, page_notices(document, index))

        return PageSource(index, render, lambda: document.page_text(index))

    def token_key(self, document_sha256: str | None, index: int) -> str | None:
        """The token cache's key of a page (None without the document's hash)."""
        if document_sha256 is None:
            return None
        return token_cache_key(document_sha256, index, self.encoder.anyres, DEFAULT_MAX_PIXELS, *self._weights_identity,
                               dtype=str(self.encoder.dtype).removeprefix("torch."), device=self.encoder.device.type,
                               highres_scale=self.encoder.highres_scale)

    def prepare_page(self, file: str, page: PageSource, document_sha256: str | None, timings: Timings) -> PreparedPage:
        """Visual tokens of the page, from the cache or rendered and encoded, within the model's limit."""
        key = self.token_key(document_sha256, page.index)
        encoded, text, notices = self._encoded_page(page, key, timings)
        if encoded.n_tokens > self.bundle.max_visual_tokens:
            raise ModelError(
                f"{file}: page {page.index + 1} makes {encoded.n_tokens} visual tokens, over the model's limit of "
                f"{self.bundle.max_visual_tokens}; raise max_visual_tokens in the bundle"
            )
        return PreparedPage(page.index, encoded.tokens.numpy().astype(np.float32, copy=False), key, text, notices)

    def prepare_pages(self, file: str, pages: Sequence[PageSource], document_sha256: str | None,
                      timings: Timings, text_layer: bool) -> Iterator[PreparedPage]:
        """The pages' visual tokens, one page at a time, rendered and encoded as each is drawn. With
        ``text_layer`` each page's text layer comes along, read here even for a cached page, so the
        LLM's half never goes back to the document."""
        for page in pages:
            prepared = self.prepare_page(file, page, document_sha256, timings)
            if text_layer and prepared.text is None:
                prepared.text = page.text()
            yield prepared

    def _encoded_page(self, page: PageSource, key: str | None,
                      timings: Timings) -> tuple[EncodedPage, str | None, ReadNotices]:
        """Visual tokens of the page, from the cache or rendered and encoded; plus the rendered text
        layer and what MuPDF said rendering the page (now, or when its tokens were cached)."""
        if self.token_cache is not None and key is not None:
            cached = self.token_cache.get(key)
            if cached is not None:
                return cached.page, None, cached.notices
        rendered = page.render()
        timings.render_s += rendered.render_s
        started = time.perf_counter()
        encoded = self.encoder.encode(rendered.image)
        timings.encode_s += time.perf_counter() - started
        if self.token_cache is not None and key is not None:
            self.token_cache.put(key, CachedPage(encoded, rendered.notices))
        return encoded, rendered.text, rendered.notices
