"""benchmarks/fragmentation.py: its pages are what they claim to be, and its whole pipeline
(pages, bases, fila train's loop for every row, evaluation, the table) runs at a trivial size."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fila_cli.documents.canvas import plan_canvas
from fila_cli.documents.page_geometry import crops_touched

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fragmentation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fragmentation_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page_canvas,grid,snap", [((84, 168), (1, 2), 7.0), ((168, 168), (2, 2), 0.0)])
def test_answers_inside_touch_one_crop_and_straddling_ones_two(bench, tmp_path, page_canvas, grid, snap):
    """Measured from the pixels, not from the generator's own bookkeeping: with no distractor words
    the page's ink is the answer, and its box on fila's canvas crosses a crop boundary exactly when
    the row says "straddling". The benchmark's 1x2 pages, and 2x2 ones (both kinds of cut), free placement."""
    scale = bench.Scale(n_words=(0, 0), page_canvas=page_canvas, snap=snap, code_length=(1, 3))
    _, rows = bench.make_pages(tmp_path, 24, seed=3, scale=scale)
    assert [row.placement for row in rows[:2]] == ["inside", "straddling"]
    assert {row.cut for row in rows if row.placement == "straddling"} == ({"vertical"} if grid == (1, 2) else {"vertical", "horizontal"})
    for row in rows:
        image = Image.open(tmp_path / "images" / row.image)
        ink = np.argwhere(np.asarray(image.convert("L")) < 128)  # [n, (y, x)]
        geometry = plan_canvas((image.height, image.width), scale.anyres())
        assert geometry.grid == grid
        to_canvas = geometry.resized_size[1] / image.width
        box = (ink[:, 1].min() * to_canvas, ink[:, 0].min() * to_canvas,
               (ink[:, 1].max() + 1) * to_canvas, (ink[:, 0].max() + 1) * to_canvas)
        crops = crops_touched(box, geometry)
        assert len(crops) == (1 if row.placement == "inside" else 2), (row, box)
        assert crops == row.crops


def test_smoke_runs_every_row_end_to_end(bench, capsys):
    report = bench.main(["--smoke", "--jobs", "1", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"].keys() == {row.name for row in bench.ROWS}
    for runs in report["results"].values():
        (scores,) = runs  # one seed
        assert scores["inside"]["n"] == scores["straddling"]["n"] == 2
        assert 0.0 <= scores["inside"]["exact"] <= 1.0 and np.isfinite(scores["final_loss"])
    table = bench.table(report["results"], list(bench.ROWS))
    assert all(row.label in table for row in bench.ROWS)
