"""Evidence: an answer located on real pages (real PyMuPDF), its boxes, and the crop boundaries that cut it.

The boxes are checked against what PyMuPDF's own search reports, against the canvas geometry
(where anyres's crop boundaries fall on the page) and against the pixels: of fila's render of the
page (rotated, landscape and cropped pages) and of the picture `fila crops --find` draws.
"""

from __future__ import annotations

import json

import numpy as np
import pymupdf
import pytest
from PIL import Image
from typer.testing import CliRunner

from fila_cli.cli.app import app
from fila_cli.cli.crops_view import EVIDENCE_INSIDE_COLOR, EVIDENCE_STRADDLING_COLOR, crop_boundaries_on_page
from fila_cli.config import AnyresConfig
from fila_cli.documents import page_words as page_words_module
from fila_cli.documents.answer_match import canonical_number, compact
from fila_cli.documents.canvas import plan_canvas
from fila_cli.documents.document import open_document
from fila_cli.documents.evidence import crop_boundary_notice, locate_answer
from fila_cli.documents.page_geometry import document_page_geometry
from fila_cli.documents.page_words import tessdata_folder
from fila_cli.documents.render import render_for_canvas
from fila_cli.documents.sample import SAMPLE_TOTAL_DUE, write_sample_invoice

TOTAL = "2,510.40 GBP"
IBAN = "GB29 NWBK 6016 1331 9268 19"
DUE_DATE = "17 May 2024"
TOTALS_PAGE = 1  # 0-based: the sample's page 2
SCANNED_PAGE = 2


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_invoice(tmp_path_factory.mktemp("sample") / "invoice.pdf")


def search_box(path, index, text):
    with pymupdf.open(path) as pdf:
        found = pdf[index].search_for(text)
    assert len(found) == 1
    return tuple(found[0])


def find(path, text, *extra):
    result = CliRunner().invoke(app, ["crops", str(path), "--find", text, "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def vertical_boundaries_in_points(path, index):
    """Where the crops' vertical boundaries fall on the page, in points: from fila's render and its canvas."""
    config = AnyresConfig()
    with open_document(path) as document:
        image = render_for_canvas(document, index, config)
        width_pt, _ = document.page_size_points(index)
    xs, _ = crop_boundaries_on_page(plan_canvas((image.height, image.width), config))
    return [x * width_pt / image.width for x in xs]


def test_sample_total_iban_and_due_date_located_with_pymupdfs_boxes(sample):
    assert SAMPLE_TOTAL_DUE == TOTAL
    for text, straddles, crops in ((TOTAL, False, [0]), (IBAN, True, [0, 1]), (DUE_DATE, False, [1])):
        found = find(sample, text)
        assert found["page"] == 2 and found["grid"] == [2, 2] and found["evidence_reason"] is None
        [box] = found["evidence"]
        assert box["page"] == 2 and box["text"] == text and box["match"] == "exact" and box["source"] == "text layer"
        assert box["bbox_pt"] == pytest.approx(search_box(sample, TOTALS_PAGE, text), abs=0.01)
        assert box["straddles_crop_boundary"] is straddles and box["crops"] == crops

    # Against the geometry: the page's one vertical boundary, at its middle, cuts the IBAN's "6016"
    # group and neither the total nor the date.
    [boundary] = vertical_boundaries_in_points(sample, TOTALS_PAGE)
    assert boundary == pytest.approx(612 / 2, abs=1)
    x0, _, x1, _ = search_box(sample, TOTALS_PAGE, "6016")
    assert x0 < boundary < x1
    for text in (TOTAL, DUE_DATE):
        x0, _, x1, _ = search_box(sample, TOTALS_PAGE, text)
        assert not x0 < boundary < x1


def is_color(pixel, color, tolerance=10):
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, color))


def test_the_drawn_picture_outlines_the_iban_red_and_the_total_green(sample, tmp_path):
    for text, color in ((IBAN, EVIDENCE_STRADDLING_COLOR), (TOTAL, EVIDENCE_INSIDE_COLOR)):
        out = tmp_path / "found.png"
        result = CliRunner().invoke(app, ["crops", str(sample), "--find", text, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "across a crop boundary" in result.stdout if color == EVIDENCE_STRADDLING_COLOR else "inside crop 1" in result.stdout
        picture = np.asarray(Image.open(out).convert("RGB"))
        width = picture.shape[1]
        x0, y0, x1, y1 = search_box(sample, TOTALS_PAGE, text)
        scale = width / 612
        middle_y = round((y0 + y1) / 2 * scale)
        # The outline runs just outside the text's box: left and right edges on the text's middle row.
        row = picture[middle_y]
        left = [x for x in range(int(x0 * scale) - 6, int(x0 * scale) + 1) if is_color(row[x], color)]
        right = [x for x in range(int(x1 * scale), int(x1 * scale) + 7) if is_color(row[x], color)]
        assert left and right, text
        # Nowhere else on that row is the outline's colour but at the two edges (and, in red, the crop boundary).
        others = [x for x in range(width) if is_color(row[x], color) and not (min(left) <= x <= max(left) or min(right) <= x <= max(right))]
        if color == EVIDENCE_INSIDE_COLOR:
            assert not others
        else:
            [boundary] = vertical_boundaries_in_points(sample, TOTALS_PAGE)
            assert all(abs(x - boundary * scale) <= 3 for x in others)


@pytest.mark.parametrize("answer,kind", [("2,510.40 GBP", "exact"), ("2510.40", "normalised"), ("GBP 2 510,40", "normalised"),
                                         ("£2,510.40", "normalised"), ("gbp 2.510,40", "normalised")])
def test_normalised_matching_locates_the_same_words(sample, answer, kind):
    with open_document(sample) as document:
        evidence = locate_answer(document, [TOTALS_PAGE], answer)
    [box] = evidence.boxes
    assert box.match == kind and box.text == TOTAL
    assert box.bbox_pt == pytest.approx(search_box(sample, TOTALS_PAGE, TOTAL), abs=0.01)


def test_an_answer_saying_more_than_the_page_is_a_partial_match(sample):
    with open_document(sample) as document:
        evidence = locate_answer(document, [0, 1], "The total due is £2,510.40.")
    [box] = evidence.boxes
    assert (box.page, box.match, box.text) == (2, "partial", TOTAL)


def test_absent_answer_is_not_found(sample):
    with open_document(sample) as document:
        evidence = locate_answer(document, [0, 1], "9,999.99 EUR")
    assert evidence.to_json() == {"evidence": [], "evidence_reason": "not found"}


def test_scanned_page_without_ocr_has_no_text_layer(sample, monkeypatch):
    with open_document(sample) as document:
        assert locate_answer(document, [SCANNED_PAGE], "M. Weber", ocr=False).to_json() == {
            "evidence": [], "evidence_reason": "no text layer"}
        # OCR asked for but Tesseract missing: the reason says what to install.
        monkeypatch.setattr(page_words_module, "tessdata_folder", lambda: None)
        reason = locate_answer(document, [SCANNED_PAGE], "M. Weber").reason
    assert reason.startswith("no text layer;") and "tesseract-ocr" in reason


@pytest.mark.skipif(tessdata_folder() is None, reason="Tesseract is not installed (apt install tesseract-ocr)")
def test_scanned_page_located_by_ocr(sample, tmp_path):
    with open_document(sample) as document:
        evidence = locate_answer(document, [SCANNED_PAGE], "19 April 2024")
    [box] = evidence.boxes
    assert (box.page, box.source, box.text) == (3, "ocr", "19 April 2024")
    # The scan is a picture of the same text typeset on the same page: OCR's box is where the text layer's would be.
    from fila_cli.documents.sample import _delivery_note_page, _write_page

    typeset = pymupdf.open()
    _write_page(typeset.new_page(width=612, height=792), *_delivery_note_page())
    [expected] = typeset[0].search_for("19 April 2024")
    # OCR boxes the ink, the text layer the font's full height: same line and run, inside its box.
    x0, y0, x1, y1 = box.bbox_pt
    assert (x0, x1) == pytest.approx((expected.x0, expected.x1), abs=3)
    assert expected.y0 - 1 <= y0 < y1 <= expected.y1 + 1 and y1 - y0 >= 0.5 * expected.height


# -- pages shown otherwise than written: landscape, rotated, cropped -----------------------------

MARKER = "ZX-4471-Q"


def write_page(path, *, size=(595, 842), at=(100, 200), rotation=0, cropbox=None, fontsize=14):
    document = pymupdf.open()
    page = document.new_page(width=size[0], height=size[1])
    page.insert_text(at, MARKER, fontsize=fontsize, fontname="helv")
    if cropbox is not None:
        page.set_cropbox(pymupdf.Rect(cropbox))
    page.set_rotation(rotation)
    document.save(path)
    return path


def ink_box(image):
    """(x0, y0, x1, y1) of the dark pixels of a render, in pixels."""
    dark = np.asarray(image.convert("L")) < 128
    ys, xs = np.nonzero(dark)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("case", [
    {"size": (842, 595)},  # landscape
    {"rotation": 90}, {"rotation": 180}, {"rotation": 270},
    {"cropbox": (60, 150, 400, 600)},
    {"cropbox": (60, 150, 400, 600), "rotation": 90},
    {"size": (842, 595), "rotation": 270, "at": (600, 500)},
])
def test_box_is_where_the_page_shows_the_text(tmp_path, case):
    path = write_page(tmp_path / "page.pdf", **case)
    config = AnyresConfig()
    with open_document(path) as document:
        [box] = locate_answer(document, [0], MARKER, config).boxes
        image = render_for_canvas(document, 0, config)  # fila's render, rotation and crop box applied
        geometry = document_page_geometry(document, 0, config)
        width_pt, height_pt = document.page_size_points(0)
    assert box.match == "exact"
    # The text is the page's only ink: the box in render pixels holds it, to a pixel or two (glyph
    # boxes reach from the font's ascender to its descender, beyond the ink).
    ink = ink_box(image)
    x0, y0, x1, y1 = box.bbox_px
    assert x0 - 1 <= ink[0] and y0 - 1 <= ink[1] and ink[2] <= x1 + 1 and ink[3] <= y1 + 1
    long_side = max(x1 - x0, y1 - y0)
    assert max(ink[2] - ink[0], ink[3] - ink[1]) >= 0.8 * long_side  # and the box is not much larger
    # Points and pixels agree, and the pixels are those of the picture fila renders.
    assert geometry.canvas == plan_canvas((image.height, image.width), config)
    assert box.bbox_px == pytest.approx(tuple(v * image.width / width_pt for v in box.bbox_pt), rel=0.01)
    assert 0 <= box.bbox_pt[0] < box.bbox_pt[2] <= width_pt and 0 <= box.bbox_pt[1] < box.bbox_pt[3] <= height_pt


def test_text_outside_the_crop_box_is_not_evidence(tmp_path):
    path = write_page(tmp_path / "page.pdf", at=(100, 700), cropbox=(0, 0, 595, 400))
    with open_document(path) as document:
        assert locate_answer(document, [0], MARKER, ocr=False).reason == "no text layer"  # nothing shown has text


def test_a_match_across_a_line_break_gets_a_box_per_line(tmp_path):
    document = pymupdf.open()
    page = document.new_page(width=595, height=842)
    page.insert_text((72, 100), "Signed for the supplier by Ada", fontsize=12, fontname="helv")
    page.insert_text((72, 116), "Lovelace, managing director.", fontsize=12, fontname="helv")
    document.save(tmp_path / "two-lines.pdf")
    with open_document(tmp_path / "two-lines.pdf") as opened:
        [box] = locate_answer(opened, [0], "Ada Lovelace").boxes
    assert box.match == "exact" and box.text == "Ada Lovelace" and len(box.line_boxes_pt) == 2
    first, second = box.line_boxes_pt
    assert first == pytest.approx(tuple(page.search_for("Ada")[0]), abs=0.01)
    assert second == pytest.approx(tuple(page.search_for("Lovelace")[0]), abs=0.01)  # the comma is not evidence
    assert "line_boxes_pt" in box.to_json()


def test_numbers_are_compared_by_value():
    assert canonical_number("2,510.40") == canonical_number("2.510,40") == canonical_number("2510.4") == "2510.4"
    assert canonical_number("1,5") == "1.5" and canonical_number("310.00") == "310" and canonical_number("-3.50") == "-3.5"
    assert canonical_number("1,234,567") == "1234567" and canonical_number("0.510") == "0.51"
    assert compact("(2,510.40)") == "2510.4" and compact("GBP") == "" and compact("2024.") == "2024"
    assert compact("INV-2024-0417,") == "inv20240417" and compact("£12") == "12"


def test_the_notice_is_for_fusion_off_and_straddling_only(sample):
    with open_document(sample) as document:
        iban = locate_answer(document, [TOTALS_PAGE], IBAN)
        total = locate_answer(document, [TOTALS_PAGE], TOTAL)
    assert crop_boundary_notice(iban, fusion=False) == (
        "the answer lies across a crop boundary on page 2; a model without FILA fusion may misread such text (see `fila crops`)")
    assert crop_boundary_notice(iban, fusion=True) is None
    assert crop_boundary_notice(total, fusion=False) is None


def test_find_without_page_searches_every_page_and_says_when_absent(sample):
    found = find(sample, "Contoso Consulting GmbH", "--page", "1")
    assert [b["page"] for b in found["evidence"]] == [1]
    result = CliRunner().invoke(app, ["crops", str(sample), "--find", "no such words"])
    assert result.exit_code == 0 and "not found" in result.stdout
    assert CliRunner().invoke(app, ["crops", str(sample)]).exit_code == 2  # neither --output nor --find
    assert CliRunner().invoke(app, ["crops", str(sample), "-o", "x.png", "--json"]).exit_code == 2  # --json without --find


@pytest.mark.skipif(tessdata_folder() is None, reason="Tesseract is not installed (apt install tesseract-ocr)")
def test_a_scan_stored_sideways_and_shown_upright_is_located_where_shown(sample, tmp_path):
    """Scanners often store a page sideways with /Rotate turning it upright: OCR reads what is shown,
    and the box is where the upright page shows the text (the same box as on the sample's upright scan)."""
    from fila_cli.documents.sample import _delivery_note_page, _scanned

    document = pymupdf.open()
    page = document.new_page(width=792, height=612)
    page.insert_image(page.rect, pixmap=_scanned(*_delivery_note_page()), rotate=270)
    page.set_rotation(270)
    document.save(tmp_path / "sideways.pdf")
    with open_document(sample) as upright, open_document(tmp_path / "sideways.pdf") as sideways:
        assert sideways.page_size_points(0) == upright.page_size_points(SCANNED_PAGE) == (612, 792)
        [expected] = locate_answer(upright, [SCANNED_PAGE], "19 April 2024").boxes
        [box] = locate_answer(sideways, [0], "19 April 2024").boxes
    assert box.source == "ocr" and box.bbox_pt == pytest.approx(expected.bbox_pt, abs=1.5)


def test_a_text_layer_of_unknown_characters_is_no_text_layer():
    """Fonts without a Unicode mapping give U+FFFD for every character: such a page is read by OCR."""
    from fila_cli.documents.page_words import PageWord, _legible

    box = (0.0, 0.0, 1.0, 1.0)
    assert _legible([PageWord("Total", (box,) * 5, 0), PageWord("2,510.40\ufffd", (box,) * 9, 0)])
    assert not _legible([PageWord("\ufffd\ufffd\ufffd", (box,) * 3, 0), PageWord("a\ufffd", (box,) * 2, 0)])
