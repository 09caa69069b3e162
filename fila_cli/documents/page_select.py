"""Choosing which pages of a multi-page document to read for a question.

Reading a page with the vision model costs seconds, so for a long PDF we first look at the pages'
text layers, which are free: Okapi BM25 ranks the pages by the words they share with the question,
and the best page is read. Scanned pages have no text layer; when no page can be chosen by its
text the caller reads every candidate page and keeps the most confident answer.

BM25 is a dozen lines here rather than a dependency (``rank-bm25``): we need one scoring pass over a
handful of pages, Lucene's non-negative idf (rank-bm25's Okapi idf goes negative for words on more
than half of the pages, which would punish a page for matching), and the matched words themselves,
to explain the choice.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: BM25 itself needs no PDF library
    from fila_cli.documents.document import Document

# BM25's term-frequency saturation and length normalisation: the usual defaults (Lucene, Robertson).
BM25_K1 = 1.2
BM25_B = 0.75
# A page "has a text layer" with at least this many word tokens. Scans often carry a stray page
# number or a scanner's stamp as text; that is not a text layer to choose by.
MIN_TEXT_LAYER_TOKENS = 5
# Text layers are trusted to choose pages only when at least this share of the pages has one: in a
# mostly scanned document the few typed pages (a cover letter) would win every question.
MIN_TEXT_LAYER_FRACTION = 0.5
# Matched words quoted in a reason, at most.
MAX_REASON_TERMS = 4

# Words of questions that say nothing about where the answer is. Kept small on purpose: a word
# that might be the subject of a question ("total", "date", "page") never belongs here.
STOP_WORDS: frozenset[str] = frozenset(
    """
    a an the and or but if of in on at to for from by with about as into over under than then
    what which who whom whose when where why how is are was were be been being am do does did done
    this that these those it its there here their they them he she his her him i me my we our us
    you your can could would should will shall may might must please tell give show find list
    according document shown say says said much many any some all
    """.split()
)

_TOKEN = re.compile(r"\w+", re.UNICODE)
# Without a text layer to narrow the choice, at most this many pages are read (each one is a full
# encode and LLM prefill); --pages reads any others.
MAX_PAGES_WITHOUT_TEXT = 20


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; digits are words too ("2023", "42"), underscores split words."""
    return [token for raw in _TOKEN.findall(text.lower()) for token in raw.split("_") if token]


def query_terms(question: str) -> list[str]:
    """The question's distinct tokens in order, stop words removed."""
    return list(dict.fromkeys(token for token in tokenize(question) if token not in STOP_WORDS))


@dataclass(frozen=True)
class PageScore:
    page: int  # 0-based
    score: float
    matched_terms: list[str] = field(default_factory=list)  # question terms found on the page, in question order


@dataclass(frozen=True)
class PageChoice:
    pages: list[int]  # 0-based; best first when chosen by text, else in document order
    reason: str
    by_text: bool  # True when the pages were chosen by their text layers


def rank_pages_by_text(question: str, page_texts: list[str]) -> list[PageScore]:
    """Score every page against the question with Okapi BM25; best first, ties by page order.

    score(page) = sum over question terms t of
        idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(page) / mean_len)),
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)), with tf the count of t on the page, df the number
    of pages containing t and N the number of pages.
    """
    terms = query_terms(question)
    pages = [Counter(tokenize(text)) for text in page_texts]
    n_pages = len(pages)
    lengths = [sum(counts.values()) for counts in pages]
    mean_length = (sum(lengths) / n_pages) if n_pages else 0.0
    doc_freq = {term: sum(1 for counts in pages if term in counts) for term in terms}
    scores = []
    for index, counts in enumerate(pages):
        score = 0.0
        matched = []
        for term in terms:
            tf = counts.get(term, 0)
            if tf == 0:
                continue
            matched.append(term)
            idf = math.log(1.0 + (n_pages - doc_freq[term] + 0.5) / (doc_freq[term] + 0.5))
            norm = 1.0 - BM25_B + BM25_B * lengths[index] / mean_length
            score += idf * tf * (BM25_K1 + 1.0) / (tf + BM25_K1 * norm)
        scores.append(PageScore(index, score, matched))
    return sorted(scores, key=lambda s: (-s.score, s.page))


def has_text_layer(text: str) -> bool:
    """Whether a page's extracted text is a real text layer, not a scan's stray page number."""
    return len(tokenize(text)) >= MIN_TEXT_LAYER_TOKENS


def choose_pages(question: str, page_texts: list[str], *, max_pages: int = 1) -> PageChoice:
    """Choose the pages to read for ``question``, given each page's text layer ("" for none).

    The rules, in order:

    1. One page: read it (``by_text=False``: there was nothing to choose).
    2. Fewer than ``MIN_TEXT_LAYER_FRACTION`` of the pages have a text layer (a page has one when
       it holds at least ``MIN_TEXT_LAYER_TOKENS`` words; none does in a scanned document): read
       every page (``by_text=False``); the caller keeps the most confident answer.
    3. The question has no content words (only stop words, e.g. "what is this?"): every page,
       ``by_text=False``.
    4. Some page's text scores above zero under BM25: the ``max_pages`` best pages, best first
       (ties go to the earlier page), ``by_text=True``, with a reason naming the matched words.
       Pages without a text layer can still score (their few words may match); a scanned page
       simply never wins on text it does not have.
    5. Otherwise (text layers exist but none shares a word with the question; the answer may be
       on a scanned page or phrased differently): every page, ``by_text=False``.
    """
    if max_pages < 1:
        raise ValueError(f"max_pages must be at least 1, got {max_pages}")
    n_pages = len(page_texts)
    every_page = list(range(n_pages))
    if n_pages == 0:
        raise ValueError("a document without pages has nothing to choose from")
    if n_pages == 1:
        return PageChoice([0], "the document has one page", by_text=False)
    with_text = sum(1 for text in page_texts if has_text_layer(text))
    if with_text == 0:
        return PageChoice(every_page, f"no page has a text layer (scanned); reading all {n_pages} pages", by_text=False)
    if with_text < MIN_TEXT_LAYER_FRACTION * n_pages:
        return PageChoice(
            every_page,
            f"only {with_text} of {n_pages} pages have a text layer (mostly scanned); reading all {n_pages} pages",
            by_text=False,
        )
    if not query_terms(question):
        return PageChoice(every_page, f"the question has no words to look for; reading all {n_pages} pages", by_text=False)
    ranked = [score for score in rank_pages_by_text(question, page_texts) if score.score > 0]
    if not ranked:
        return PageChoice(
            every_page, f"no page's text layer contains the question's words; reading all {n_pages} pages", by_text=False
        )
    best = ranked[:max_pages]
    return PageChoice([score.page for score in best], _reason(best), by_text=True)


def _reason(best: list[PageScore]) -> str:
    parts = []
    for score in best:
        quoted = ", ".join(f"'{term}'" for term in score.matched_terms[:MAX_REASON_TERMS])
        more = len(score.matched_terms) - MAX_REASON_TERMS
        if more > 0:
            quoted += f" and {more} more"
        parts.append(f"page {score.page + 1} matches {quoted}")
    where = "in its text layer" if len(parts) == 1 else "in their text layers"
    return f"{'; '.join(parts)} {where}"



# How the pages were chosen: the ``method`` of the JSON record's ``page_choice``.
METHOD_GIVEN = "--pages"
METHOD_BM25 = "text-layer BM25"
METHOD_ALL = "all pages, most confident"
METHOD_ONLY = "the only page"  # a one-page document (a PNG, a one-page PDF): nothing was chosen


@dataclass(frozen=True)
class PagePlan:
    """The pages to read (0-based) and why: ``method`` (one of the METHOD_* names) and a sentence."""

    indices: list[int]
    method: str
    detail: str


def plan_pages(document: Document, question: str, pages: str | None) -> PagePlan:
    """The pages to read for ``question``: those of ``--pages``, else chosen by text, else all of them."""
    from fila_cli.documents.document import parse_page_spec

    if pages is not None:
        chosen = parse_page_spec(pages, document.page_count, name=document.path)
        return PagePlan(chosen, METHOD_GIVEN, "pages given with --pages")
    if document.page_count == 1:
        return PagePlan([0], METHOD_ONLY, "the document has one page")
    choice = choose_pages(question, [document.page_text(i) for i in range(document.page_count)])
    if not choice.by_text and len(choice.pages) > MAX_PAGES_WITHOUT_TEXT:
        # Every page costs a full encode and prefill: a 5,000-page scan would run for hours.
        return PagePlan(list(choice.pages[:MAX_PAGES_WITHOUT_TEXT]), METHOD_ALL, (
            f"no usable text layer; read the first {MAX_PAGES_WITHOUT_TEXT} of {document.page_count} pages "
            f"(pass --pages to read others)"
        ))
    return PagePlan(list(choice.pages), METHOD_BM25 if choice.by_text else METHOD_ALL, choice.reason)


def choose_page_indices(document: Document, question: str, pages: str | None) -> tuple[list[int], str]:
    """0-based pages to read and why (``plan_pages`` without the method)."""
    plan = plan_pages(document, question, pages)
    return plan.indices, plan.detail
