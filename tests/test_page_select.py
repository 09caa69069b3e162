"""Choosing pages by their text layers: BM25 against hand-computed values, and the choice rules."""

from __future__ import annotations

import pytest

from fila_cli.documents.document import open_document
from fila_cli.documents.page_select import PageChoice, choose_pages, query_terms, rank_pages_by_text, tokenize
from tests.helpers.bad_documents import make_good_pdf

INVOICE = "Invoice 1001 issued 3 March 2024 to Acme Ltd. Total due 42.00 EUR within 30 days."
SHIPPING = "Shipping address: 12 Harbour Road, Portsmouth. Parcel weight 3 kg, carrier DHL express."
TERMS = "Terms and conditions: goods remain our property until paid in full; disputes go to court."


def test_tokenize_lowercases_and_keeps_numbers():
    assert tokenize("Total DUE: 42.00 EUR (2024)") == ["total", "due", "42", "00", "eur", "2024"]
    assert tokenize("snake_case") == ["snake", "case"]
    assert tokenize("Café Zürich") == ["café", "zürich"]


def test_query_terms_drop_stop_words_and_repeats():
    assert query_terms("What is the total due?") == ["total", "due"]
    assert query_terms("What is the total, the TOTAL due in 2024?") == ["total", "due", "2024"]
    assert query_terms("what is this?") == []


def test_bm25_scores_match_hand_computed_values():
    # N = 3 pages of lengths 3, 2, 2 (mean 7/3); k1 = 1.2, b = 0.75.
    # idf(total) = ln(1 + 1.5/2.5) = ln 1.6 (on two pages); idf(due) = ln(1 + 2.5/1.5) = ln(8/3).
    # page 0: norm = 0.25 + 0.75 * 3/(7/3); ln1.6 * 2*2.2/(2 + 1.2 norm) + ln(8/3) * 2.2/(1 + 1.2 norm)
    # page 2: norm = 0.25 + 0.75 * 2/(7/3); ln1.6 * 2.2/(1 + 1.2 norm)
    scores = rank_pages_by_text("What is the total due?", ["total due total", "shipping address", "net total"])
    assert [s.page for s in scores] == [0, 2, 1]
    assert scores[0].score == pytest.approx(1.476370768, rel=1e-9)
    assert scores[1].score == pytest.approx(0.499176268, rel=1e-9)
    assert scores[2].score == 0.0
    assert scores[0].matched_terms == ["total", "due"]
    assert scores[1].matched_terms == ["total"]


def test_bm25_rare_words_outweigh_common_ones():
    pages = ["report total", "report total", "report total", "report due"]
    scores = {s.page: s.score for s in rank_pages_by_text("report due total", pages)}
    # "due" is on one page, "total" on three: the page with the rare word wins.
    assert scores[3] > scores[0] == scores[1] == scores[2]


def test_bm25_does_not_let_stop_words_dominate():
    pages = ["what is the the the of the is what", "invoice total 42"]
    best = rank_pages_by_text("What is the total of the invoice?", pages)[0]
    assert best.page == 1


def test_bm25_ties_go_to_the_earlier_page():
    scores = rank_pages_by_text("total", ["a total b", "c total d"])
    assert [s.page for s in scores] == [0, 1]


def test_choose_the_page_whose_text_matches():
    choice = choose_pages("What is the total due?", [SHIPPING, TERMS, INVOICE])
    assert choice == PageChoice([2], "page 3 matches 'total', 'due' in its text layer", by_text=True)


def test_choose_several_pages_best_first():
    choice = choose_pages("Which carrier ships the parcel and what is the total?", [INVOICE, TERMS, SHIPPING], max_pages=2)
    assert choice.by_text
    assert choice.pages == [2, 0]
    assert choice.reason == "page 3 matches 'carrier', 'parcel'; page 1 matches 'total' in their text layers"


def test_scanned_only_document_reads_every_page():
    choice = choose_pages("What is the total due?", ["", "  ", "\n"])
    assert choice.by_text is False
    assert choice.pages == [0, 1, 2]
    assert "no page has a text layer" in choice.reason


def test_mostly_scanned_document_reads_every_page():
    # A typed cover letter among scans must not win every question.
    choice = choose_pages("What is the total due?", [INVOICE, "", "", "7"])
    assert choice.by_text is False
    assert choice.pages == [0, 1, 2, 3]


def test_no_matching_words_or_no_content_words_reads_every_page():
    no_match = choose_pages("Who signed the lease?", [INVOICE, SHIPPING, TERMS])
    assert (no_match.by_text, no_match.pages) == (False, [0, 1, 2])
    no_words = choose_pages("What is this?", [INVOICE, SHIPPING, TERMS])
    assert (no_words.by_text, no_words.pages) == (False, [0, 1, 2])


def test_single_page_is_read_without_choosing():
    assert choose_pages("What is the total?", [INVOICE]) == PageChoice([0], "the document has one page", by_text=False)


def test_bad_arguments():
    with pytest.raises(ValueError):
        choose_pages("total", [INVOICE, TERMS], max_pages=0)
    with pytest.raises(ValueError):
        choose_pages("total", [])


def test_choose_pages_from_a_real_pdf_with_a_scanned_page(tmp_path):
    path = make_good_pdf(tmp_path / "mixed.pdf", [SHIPPING, INVOICE, "Reference number QX-7731 for the claim"], scanned_page=2)
    with open_document(path) as document:
        texts = [document.page_text(i) for i in range(document.page_count)]
    assert texts[2].strip() == ""
    by_text = choose_pages("What is the total due?", texts)
    assert (by_text.pages, by_text.by_text) == ([1], True)
    # The scanned page's words are invisible to the text layer: every page is read instead.
    scanned = choose_pages("What is the reference number of the claim?", texts)
    assert (scanned.pages, scanned.by_text) == ([0, 1, 2], False)
