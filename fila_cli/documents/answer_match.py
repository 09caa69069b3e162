"""Finding an answer among a page's words, as written or as the same value written another way.

Three kinds of match, tried in order:

- ``exact``: the answer's characters, word for word (whitespace and line breaks aside);
- ``normalised``: the same after case folding, dropping punctuation and currency, and reading
  numbers by value: "2510.40", "2,510.40", "2 510,40" and "GBP 2.510,40" are one amount;
- ``partial``: the longest run of the answer's words found on the page that holds a number or a
  key word (an answer that says more than the page, such as "The total is 2,510.40").

Matching is done on a *compact* form of every word (``compact``) laid end to end: a match must
start where a page word starts and end where one ends, so that "2 510,40" (two words on the
page) matches "2510.40" (one in the answer), an IBAN matches with or without its spaces, and
line breaks inside the match do not matter. A currency next to a matched amount is part of the
evidence, whichever side of it and whether or not the answer names it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from fila_cli.documents.page_words import PageWord

EXACT, NORMALISED, PARTIAL = "exact", "normalised", "partial"
CURRENCY_CODES = frozenset({"aud", "brl", "cad", "chf", "cny", "czk", "dkk", "eur", "gbp", "hkd", "huf", "inr", "jpy",
                            "krw", "mxn", "nok", "nzd", "pln", "rub", "sek", "sgd", "try", "usd", "zar"})
CURRENCY_SYMBOLS = frozenset("$£€¥₹₽₩₺₪₫฿₦₱¢")
# Stripped from either end of a word (a date's full stop, a total's brackets): not part of the evidence.
EDGE_PUNCTUATION = frozenset(".,;:!?()[]{}<>\"'«»“”‘’*%")
# Thousands separators that never mark a decimal: spaces of all widths and the Swiss apostrophe.
GROUPING_CHARACTERS = frozenset(" \u00a0\u202f\u2009'’")
NUMBER = re.compile(r"^[+\-−]?\d(?:[\d.,]*\d)?$")
THOUSANDS_GROUP_DIGITS = 3
# Words too common to count as evidence on their own in a partial match.
STOPWORDS = frozenset("a an and are as at be by for from has in is it of on or that the this to was were with".split())
MIN_KEY_WORD_LENGTH = 3
# Answers longer than this (in words) are not searched for partial matches: an essay is no evidence.
MAX_PARTIAL_WORDS = 40


@dataclass(frozen=True)
class Piece:
    """Part of one page word: characters [start, end) of ``words[word]``."""

    word: int
    start: int
    end: int


@dataclass(frozen=True)
class AnswerMatch:
    pieces: tuple[Piece, ...]  # in reading order
    kind: str  # exact, normalised or partial
    text: str  # the page's text of the match


@dataclass(frozen=True)
class _Unit:
    """A word, compared by its compact form."""

    compact: str  # "" for punctuation alone, or a currency
    currency: bool
    has_digit: bool
    core: tuple[int, int]  # the word's characters without edge punctuation


def compact(text: str) -> str:
    """A word's comparable form: case-folded letters and digits, numbers by value ("2,510.40" -> "2510.4")."""
    core = _strip_edges(text, EDGE_PUNCTUATION | CURRENCY_SYMBOLS)
    folded = unicodedata.normalize("NFKC", text[core[0]:core[1]]).casefold()
    if folded in CURRENCY_CODES:
        return ""
    if NUMBER.match(folded):
        return canonical_number(folded)
    return "".join(c for c in folded if c.isalnum())


def canonical_number(text: str) -> str:
    """Digits with "." as the decimal mark and no grouping, trailing decimal zeros dropped.

    The decimal mark is the last separator when both "." and "," appear; a lone separator
    followed by exactly three digits groups thousands ("2,510", "2.510", not "0.510"), any other marks decimals.
    """
    sign = "-" if text[0] in "-−" else ""
    body = text.lstrip("+-−")
    marks = [i for i, c in enumerate(body) if c in ".,"]
    if not marks:
        return sign + body
    last = marks[-1]
    kinds = {body[i] for i in marks}
    lone_grouping = (len(marks) == 1 and len(body) - last - 1 == THOUSANDS_GROUP_DIGITS and last <= THOUSANDS_GROUP_DIGITS
                     and not body.startswith("0"))  # "0.510" is a fraction
    if (len(kinds) == 1 and len(marks) > 1) or lone_grouping:
        return sign + "".join(c for c in body if c.isdigit())
    whole = "".join(c for c in body[:last] if c.isdigit())
    fraction = body[last + 1:].rstrip("0")
    return sign + whole + (f".{fraction}" if fraction else "")


def _strip_edges(text: str, characters: frozenset[str]) -> tuple[int, int]:
    start, end = 0, len(text)
    while start < end and text[start] in characters:
        start += 1
    while end > start and text[end - 1] in characters:
        end -= 1
    return start, end


def _unit(text: str) -> _Unit:
    core = _strip_edges(text, EDGE_PUNCTUATION)  # a currency symbol stuck to an amount stays in its box
    value = compact(text)
    bare = text[core[0]:core[1]].strip("".join(CURRENCY_SYMBOLS)).casefold()
    currency = bare in CURRENCY_CODES or (not bare and any(c in CURRENCY_SYMBOLS for c in text))
    return _Unit(value, currency, any(c.isdigit() for c in value), core)


def _answer_units(answer: str) -> list[_Unit]:
    # Currency symbols stuck to a number ("£2,510.40") are separated: the amount is what is looked for.
    words = [part for token in answer.split() for part in re.split(f"([{''.join(sorted(CURRENCY_SYMBOLS))}])", token) if part]
    return [_unit(word) for word in words]


def find_answer(answer: str, words: list[PageWord]) -> list[AnswerMatch]:
    """Every place ``answer`` is on the page, by the first kind of match that finds it; [] if none."""
    units = [_unit(word.text) for word in words]
    wanted = _answer_units(answer)
    looked_for = [u for u in wanted if not u.currency] or wanted  # a bare "GBP" is still looked for
    stream = _Stream(units)
    spans = stream.find("".join(u.compact for u in looked_for))
    if spans:
        return [_match(words, units, span, answer) for span in spans]
    if len(looked_for) > MAX_PARTIAL_WORDS:
        return []
    return [_match(words, units, span, None) for span in _partial(stream, looked_for)]


class _Stream:
    """The page's compact words end to end, with where each word starts and ends."""

    def __init__(self, units: list[_Unit]):
        self.text = ""
        self.starts: dict[int, int] = {}  # offset -> first non-empty unit starting there
        self.ends: dict[int, int] = {}  # offset -> last non-empty unit ending there
        for index, unit in enumerate(units):
            if not unit.compact:
                continue
            self.starts.setdefault(len(self.text), index)
            self.text += unit.compact
            self.ends[len(self.text)] = index

    def find(self, needle: str) -> list[tuple[int, int]]:
        """(first unit, last unit) of every occurrence of ``needle`` aligned with word boundaries."""
        if not needle:
            return []
        spans, offset = [], self.text.find(needle)
        while offset >= 0:
            end = offset + len(needle)
            if offset in self.starts and end in self.ends:
                spans.append((self.starts[offset], self.ends[end]))
            offset = self.text.find(needle, offset + 1)
        return spans


def _partial(stream: _Stream, units: list[_Unit]) -> list[tuple[int, int]]:
    """The occurrences of the best run of the answer's words found on the page: one holding a
    number first, then the most key words, then the longest."""
    best: tuple[tuple[bool, int, int], list[tuple[int, int]]] | None = None
    for first in range(len(units)):
        for last in range(first, len(units)):
            run = units[first:last + 1]
            keys = sum(_is_key(u) for u in run)
            if not keys:
                continue
            rank = (any(u.has_digit for u in run), keys, len(run))
            if best is not None and rank <= best[0]:
                continue
            spans = stream.find("".join(u.compact for u in run))
            if spans:
                best = (rank, spans)
    return best[1] if best else []


def _is_key(unit: _Unit) -> bool:
    if unit.has_digit:
        return True
    return len(unit.compact) >= MIN_KEY_WORD_LENGTH and unit.compact not in STOPWORDS


def _match(words: list[PageWord], units: list[_Unit], span: tuple[int, int], answer: str | None) -> AnswerMatch:
    first, last = _with_currency(words, units, *span)
    pieces = [Piece(i, 0, len(words[i].text)) for i in range(first, last + 1)]
    pieces[0] = Piece(first, units[first].core[0], pieces[0].end)
    pieces[-1] = Piece(last, pieces[-1].start, units[last].core[1])
    pieces = [p for p in pieces if p.end > p.start]
    text = " ".join(words[p.word].text[p.start:p.end] for p in pieces)
    if answer is None:
        kind = PARTIAL
    else:
        kind = EXACT if text == " ".join(answer.split()) else NORMALISED
    return AnswerMatch(tuple(pieces), kind, text)


def _with_currency(words: list[PageWord], units: list[_Unit], first: int, last: int) -> tuple[int, int]:
    """An amount's currency, written next to it on the same line, belongs to the evidence."""
    if not any(units[i].has_digit for i in range(first, last + 1)):
        return first, last
    if first > 0 and units[first - 1].currency and words[first - 1].line == words[first].line:
        first -= 1
    if last + 1 < len(units) and units[last + 1].currency and words[last + 1].line == words[last].line:
        last += 1
    return first, last
