"""benchmarks/fragmentation.py: its pages are what they claim to be, its reading corpus is
labelled where the digits are, and its whole curriculum (stage 0 readers, stage 1 bases, stage 2
arms through fila train's loop, evaluation, table, figure) runs at a trivial size, each stage
writing what the next one loads."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fila_cli.documents.canvas import plan_canvas
from fila_cli.documents.page_geometry import crops_touched
from fila_cli.vision.load import build_encoder
from fila_cli.vision.loaders.hf_safetensors import load_hf_vision
from fila_cli.vision.model.convnext_branch import ConvNeXtBranch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fragmentation.py"
SMOKE_SECONDS = 60


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fragmentation_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_answers_inside_touch_one_crop_and_straddling_ones_two(bench, tmp_path):
    """Measured from the pixels, not from the generator's own bookkeeping: the page's ink is the
    answer, and its box on fila's canvas crosses the crop boundary exactly when the row says
    "straddling", cut at 30-70 % of its width."""
    scale = bench.Scale(code_length=(1, 2))
    _, rows = bench.make_pages(tmp_path, 24, seed=3, scale=scale)
    assert [row.placement for row in rows[:2]] == ["inside", "straddling"]
    for row in rows:
        image = Image.open(tmp_path / "images" / row.image)
        assert (image.height, image.width) == scale.page_size()
        ink = np.argwhere(np.asarray(image.convert("L")) < 128)  # [n, (y, x)]
        geometry = plan_canvas((image.height, image.width), scale.anyres())
        assert geometry.grid == (1, 2)
        to_canvas = geometry.resized_size[1] / image.width
        box = (ink[:, 1].min() * to_canvas, ink[:, 0].min() * to_canvas,
               (ink[:, 1].max() + 1) * to_canvas, (ink[:, 0].max() + 1) * to_canvas)
        crops = crops_touched(box, geometry)
        assert len(crops) == (1 if row.placement == "inside" else 2), (row, box)
        assert crops == row.crops
        if row.placement == "straddling":
            boundary = geometry.crop_size
            assert 0.2 < (boundary - box[0]) / (box[2] - box[0]) < 0.8  # cut through the glyphs, not at an edge


def test_the_reading_corpus_is_labelled_where_the_digits_are(bench, tmp_path):
    """Every digit label sits on a patch with ink; patches without ink are "none"."""
    scale = bench.Scale()
    data = load_file(str(bench.make_dense_corpus(tmp_path / "corpus.safetensors", 6, seed=1, scale=scale)))
    canvas, labels = data["canvas"], data["labels"]  # [N, 84, 168] uint8, [N, 6, 12]
    assert canvas.shape == (6, *scale.page_canvas) and labels.shape == (6, *scale.grid)
    patch = scale.patch_size
    ink = (canvas < 128).reshape(6, scale.grid[0], patch, scale.grid[1], patch).any(4).any(2)  # [N, rows, cols]
    digits = (labels >= 0) & (labels < bench.NONE_LABEL)
    assert digits.sum() >= 6 * scale.dense_digits[0] * 0.8
    assert ink[digits].all()
    assert not ink[labels == bench.NONE_LABEL].any()


@pytest.mark.slow
def test_smoke_runs_every_stage_and_arm_and_each_writes_what_the_next_loads(bench, tmp_path, capsys):
    started = time.perf_counter()
    work = tmp_path / "work"
    report = bench.main(["--smoke", "--jobs", "1", "--json", "--work", str(work)])
    elapsed = time.perf_counter() - started
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"].keys() == {arm.name for arm in bench.ARMS}
    for name, runs in report["results"].items():
        (scores,) = runs  # one seed
        assert scores["inside"]["n"] == scores["straddling"]["n"] == 2, name
        assert 0.0 <= scores["straddling"]["exact"] <= 1.0 and np.isfinite(scores["final_loss"])
        assert scores["steps"] == (bench.SMOKE.base_steps if name == "base" else bench.SMOKE.arm_steps)
    assert report["stage0"].keys() == {"vit", "convnext", "convnext_canvas1"}
    scale = bench.Scale()
    # Stage 0 wrote its ViT into a LLaVA-NeXT checkpoint fila's loader reads, the ConvNeXts as
    # timm safetensors its branch loads; both differ from their random initialisation.
    pretrained = build_encoder(load_hf_vision(work / "stage0-vit"))
    untrained = build_encoder(load_hf_vision(work / "stage0-init"))
    assert not torch.equal(pretrained.vit.embeddings.patch_embedding.weight, untrained.vit.embeddings.patch_embedding.weight)
    for name in ("stage0-convnext.safetensors", "stage0-convnext-canvas1.safetensors"):
        ConvNeXtBranch(scale.convnext()).load_timm_weights(work / name)
    # Each seed starts from the pretrained ViT; stage 1 wrote a base, which the arms start from.
    start = build_encoder(load_hf_vision(work / "start-seed0"))
    assert torch.equal(start.vit.embeddings.patch_embedding.weight, pretrained.vit.embeddings.patch_embedding.weight)
    base = work / "runs" / "base-seed0" / "base"
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    for arm in bench.ARMS[1:]:
        config = json.loads((work / "runs" / f"{arm.name}-seed0" / "train_config.json").read_text())
        assert config["base"] == str(base)
        assert config["fusion"] is (arm.variant is not None)
        if arm.variant is not None:
            assert config["fusion_lr"] == bench.SMOKE.fusion_lr
            expected = "stage0-convnext-canvas1.safetensors" if arm.view == "canvas1" else "stage0-convnext.safetensors"
            assert config["convnext"] == str(work / expected)
    assert Path(report["figure"]).is_file()
    table = bench.table(report["results"], list(bench.ARMS))
    assert all(arm.label in table for arm in bench.ARMS)
    assert elapsed < SMOKE_SECONDS * 3, elapsed  # a minute on an idle machine; shared CPUs are slower


def test_what_the_convnext_sees_in_each_control(bench):
    """The blank control's ConvNeXt input carries nothing of the page; canvas x 1 is the page at the
    ViT canvas's resolution; per crop, a crop's maps do not depend on the other crop."""
    scale = bench.Scale()
    branch = ConvNeXtBranch(scale.convnext()).eval()
    seen = []
    branch.stage_maps = lambda canvas: seen.append(canvas) or [canvas]
    holder = type("Model", (), {})()
    holder.vision = type("Vision", (), {"convnext": branch})()
    page = torch.randn(2, 3, *scale.page_size())
    arms = {arm.name: arm for arm in bench.ARMS}
    bench.convnext_view(arms["blank"], scale)(holder)
    branch.stage_maps(page)
    assert torch.equal(seen[-1][0], seen[-1][1]) and seen[-1].std(dim=(-1, -2)).max() == 0
    branch.stage_maps = lambda canvas: seen.append(canvas) or [canvas]
    bench.convnext_view(arms["canvas1"], scale)(holder)
    branch.stage_maps(page)
    assert seen[-1].shape == page.shape and torch.equal(seen[-1], bench.to_vit_canvas_and_back(page, scale))
    assert not torch.allclose(seen[-1], page, atol=0.1)
    real = ConvNeXtBranch(scale.convnext()).eval()
    holder.vision.convnext = real
    bench.convnext_view(arms["per_crop"], scale)(holder)
    changed = page.clone()
    changed[..., scale.page_size()[1] // 2 :] = 0  # the right crop only
    with torch.no_grad():
        left_before = real(page)[-1][..., : scale.grid[1] // 2]
        left_after = real(changed)[-1][..., : scale.grid[1] // 2]
    assert torch.equal(left_before, left_after)


def test_the_figure_shows_what_greedy_decoding_writes_up_to_its_first_error(bench):
    """One teacher-forced pass knows greedy decoding's tokens up to its first error, not after it."""
    from tests.helpers.tiny_train import MISTRAL_TEMPLATE, char_tokenizer

    tokenizer = char_tokenizer(MISTRAL_TEMPLATE)
    gold = torch.tensor(tokenizer.encode("50", add_special_tokens=False) + [tokenizer.eos_token_id])

    def shown(text: str, eos: bool = True) -> str:
        ids = tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])
        return bench.greedy_prefix(tokenizer, torch.tensor(ids), gold)

    assert shown("50") == "50"  # every token right, the end of sequence too
    assert shown("30") == "3…"  # wrong at once: what follows is not greedy decoding's
    assert shown("57") == "57…"
    assert shown("500", eos=False) == "500"  # the answer goes on where it should stop
