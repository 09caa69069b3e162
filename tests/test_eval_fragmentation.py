"""The fragmentation generator, checked against the canvas anyres really picks for each page.

Each page is rendered the way `fila ask` renders it (render_for_canvas), its canvas planned from
the render (plan_canvas), and the answer found on the page by PyMuPDF's own text search (not the
generator's record): a "straddling" answer must overlap two crops of that CanvasGeometry, an
"inside" one exactly one, clear of its edges.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import asdict

import pymupdf
import pytest

from fila_cli.config import AnyresConfig
from fila_cli.documents.canvas import plan_canvas
from fila_cli.documents.document import open_document
from fila_cli.documents.render import render_for_canvas
from fila_cli.errors import ExitCode, UsageError
from fila_cli.eval.fragmentation import DATA_FILE, generator_config, make_fragmentation, read_rows

SAMPLE = 24
PNG_DPI = 200  # a scan's usual resolution


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("frag")
    make_fragmentation(out, SAMPLE, seed=7)
    return out


def overlapped_crops(box, geometry):
    x0, y0, x1, y1 = box
    return [(left, top, right, bottom) for left, top, right, bottom in geometry.crop_boxes_on_canvas()
            if x0 < right and left < x1 and y0 < bottom and top < y1]


def test_answer_boxes_against_the_canvas_anyres_picks(sample):
    config = AnyresConfig()
    rows = read_rows(sample / DATA_FILE)
    assert len(rows) == SAMPLE
    for row in rows:
        path = sample / row["image"]
        with open_document(path) as document:
            image = render_for_canvas(document, 0, config)  # exactly what fila ask does with the page
        geometry = plan_canvas((image.height, image.width), config)
        assert list(geometry.canvas_size) == row["canvas"] and list(geometry.grid) == row["grid"]

        with pymupdf.open(path) as pdf:
            page = pdf[0]
            found = page.search_for(row["answers"][0])
            assert len(found) == 1, f"{row['question_id']}: the answer must be on the page exactly once"
            scale_x, scale_y = image.width / page.rect.width, image.height / page.rect.height
        rect = found[0]
        assert [rect.x0, rect.y0, rect.x1, rect.y1] == pytest.approx(row["answer_box"], abs=0.01)
        # points -> render pixels -> canvas pixels
        (orig_h, orig_w), (res_h, res_w) = geometry.original_size, geometry.resized_size
        box = (geometry.pad_left + rect.x0 * scale_x * res_w / orig_w, geometry.pad_top + rect.y0 * scale_y * res_h / orig_h,
               geometry.pad_left + rect.x1 * scale_x * res_w / orig_w, geometry.pad_top + rect.y1 * scale_y * res_h / orig_h)
        crops = overlapped_crops(box, geometry)
        if row["placement"] == "inside":
            assert len(crops) == 1, f"{row['question_id']}: an inside answer overlaps {len(crops)} crops"
            left, top, right, bottom = crops[0]
            assert min(box[0] - left, box[1] - top, right - box[2], bottom - box[3]) >= 3.9  # CLEARANCE_PX from every edge
        else:
            assert row["placement"] == "straddling" and len(crops) >= 2, f"{row['question_id']}: does not straddle"
            # the boundary cuts the text well inside it, not at an edge
            edges = [c[0] for c in crops] if row["cut"] == "vertical" else [c[1] for c in crops]
            cut = max(edges)
            low, high = (box[0], box[2]) if row["cut"] == "vertical" else (box[1], box[3])
            assert low + 0.25 * (high - low) < cut < high - 0.25 * (high - low)


def test_the_sample_covers_both_placements_kinds_and_canvases(sample):
    rows = read_rows(sample / DATA_FILE)
    assert Counter(r["placement"] for r in rows) == {"inside": SAMPLE // 2, "straddling": SAMPLE // 2}
    assert {r["kind"] for r in rows} == {"invoice", "table", "form"}
    assert len({tuple(r["grid"]) for r in rows}) >= 2 and {r["cut"] for r in rows} >= {"vertical", "horizontal"}
    assert len({(r["font"], r["font_size"]) for r in rows}) >= 5


def test_the_same_seed_makes_the_same_rows(tmp_path):
    first = make_fragmentation(tmp_path / "a", 4, seed=11)
    again = make_fragmentation(tmp_path / "b", 4, seed=11)
    assert first == again
    assert generator_config(tmp_path / "a" / DATA_FILE) == AnyresConfig()  # the canvases it was made for
    with pytest.raises(UsageError, match="already exists"):
        make_fragmentation(tmp_path / "a", 4, seed=11)


def test_make_fragmentation_then_eval_reports_inside_and_straddling(bundle, tmp_path):
    out = tmp_path / "frag"
    made = subprocess.run([sys.executable, "-m", "fila_cli", "eval", "make-fragmentation", str(out), "--n", "4", "--seed", "3"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == ExitCode.OK, made.stderr
    assert "4 questions, 2 inside one crop, 2 straddling" in made.stderr and made.stdout == ""
    predictions = tmp_path / "predictions.jsonl"
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "eval", "--task", "fragmentation", "--data", str(out),
                                "--model", str(bundle), "--max-tokens", "3", "--limit", "2", "--json", "-o", str(predictions)],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.OK, completed.stderr
    assert "warning" not in completed.stderr  # made for the tiny model's canvases (the paper's)
    scores = json.loads(completed.stdout)
    assert scores["metric"] == "exact_match" and scores["questions"] == 2 and scores["answered"] == 2
    assert {name: g["questions"] for name, g in scores["groups"].items()} == {"inside": 1, "straddling": 1}
    # The gold answer, located on each page with the evidence locator and this model's canvases, lies
    # where the generator placed it; the accuracy is split by it.
    rows = {row["question_id"]: row for row in read_rows(out / DATA_FILE)}
    written = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["gold_evidence"] for r in written] == [rows[r["question_id"]]["placement"] for r in written]
    assert {name: g["questions"] for name, g in scores["evidence"].items()} == {"inside": 1, "straddling": 1}
    assert scores["evidence_not_located"] == 0
    for record in written:
        assert scores["evidence"][record["gold_evidence"]]["score"] == record["score"]


def test_eval_score_splits_accuracy_by_where_the_gold_answer_lies(tmp_path):
    """Predictions right on every straddling question and wrong on every inside one: the split shows it."""
    out = tmp_path / "frag"
    make_fragmentation(out, 6, seed=5)
    predictions = tmp_path / "predictions.jsonl"
    with predictions.open("w") as handle:
        for row in read_rows(out / DATA_FILE):
            answer = row["answers"][0] if row["placement"] == "straddling" else "wrong"
            handle.write(json.dumps({"question_id": row["question_id"], "answer": answer, "gold_evidence": row["placement"]}) + "\n")
    scored = subprocess.run([sys.executable, "-m", "fila_cli", "eval", "score", "--task", "fragmentation", "--data", str(out),
                             "--predictions", str(predictions), "--json"], capture_output=True, text=True, timeout=120)
    assert scored.returncode == ExitCode.OK, scored.stderr
    scores = json.loads(scored.stdout)
    assert scores["evidence"] == {"inside": {"score": 0.0, "questions": 3}, "straddling": {"score": 1.0, "questions": 3}}
    # On a terminal (a pty: piped, eval prints JSON) the table has a row for each placement.
    import pexpect

    table = pexpect.run(f"{sys.executable} -m fila_cli eval score --task fragmentation --data {out} --predictions {predictions}",
                        timeout=120, encoding="utf-8", dimensions=(50, 160))
    assert "gold across a crop boundary" in table and "gold inside one crop" in table, table


def test_gold_answers_on_image_pages_are_located_by_ocr(tmp_path):
    """An image benchmark has no text layer: with --gold-ocr (Tesseract installed) the gold answer is
    read off the pixels, and lies where the generator placed it."""
    from fila_cli.documents.page_words import tessdata_folder
    from fila_cli.eval.evidence_split import gold_placement

    out = tmp_path / "frag"
    rows = [asdict(row) for row in make_fragmentation(out, 2, seed=9)]
    config = AnyresConfig()
    located = []
    for row in rows:
        png = tmp_path / f"{row['question_id']}.png"
        with pymupdf.open(out / row["image"]) as pdf:
            pdf[0].get_pixmap(dpi=PNG_DPI).save(png)
        assert gold_placement(png, row["answers"], config) is None  # no text layer, no OCR asked for
        if tessdata_folder() is not None:
            placement = gold_placement(png, row["answers"], config, ocr=True)
            assert placement in (None, row["placement"]), row["question_id"]  # OCR may misread; never misplace
            located.append(placement)
    if tessdata_folder() is None:
        pytest.skip("Tesseract is not installed (apt install tesseract-ocr)")
    assert sum(p is not None for p in located) >= 1


def test_the_gold_locator_reads_each_page_once(tmp_path, monkeypatch):
    """Benchmarks ask several questions about one image: its words (OCR: seconds) are read once."""
    from fila_cli.eval import evidence_split

    out = tmp_path / "frag"
    [row] = [asdict(row) for row in make_fragmentation(out, 1, seed=2)]
    reads = []
    real = evidence_split.page_words
    monkeypatch.setattr(evidence_split, "page_words", lambda document, index, ocr: reads.append(index) or real(document, index, ocr=ocr))
    locator = evidence_split.GoldLocator(AnyresConfig())
    assert locator.placement(out / row["image"], row["answers"]) == row["placement"]
    assert locator.placement(out / row["image"], ["not on the page", *row["answers"]]) == row["placement"]
    assert reads == [0]
