"""Does the Hybrid Encoder help with text that anyres crop boundaries cut? A small-scale reproduction.

FILA's claim (its Figure 1) is that text cut in two by LLaVA-NeXT's crop boundaries is read better
once the whole-page ConvNeXt branch is fused into the ViT. This script trains, from scratch and
with the same budget (steps, samples, seeds), a tiny anyres-only LLaVA-NeXT and tiny hybrid models,
then measures on held-out pages how often each reads an answer that lies inside one crop versus one
that straddles a crop boundary.

What is real and what is scaled down:

- The model is fila's own: ``HybridEncoder`` (anyres cropping and packing, the ConvNeXt branch on
  the high-resolution canvas, alignment, CVFM) feeding a transformers Llama, trained by ``fila
  train``'s loop (``fila_cli.train.loop.train``: data preparation, rendering, AdamW, warm-up and
  cosine). Widths, depths and the crop size are scaled down (84-pixel crops, 14-pixel patches: the
  paper's five canvases x 1/4); nothing is pretrained, so the ViT, the ConvNeXt, the projector, CVFM
  and the whole LLM train (TrainConfig ``train_vit``, ``train_convnext``, ``full_llm``; the
  anyres-only row is ``fusion=False``), under ``export=False`` (the model is evaluated in-process).
- The pages are generated PNGs at the high-resolution canvas size (the ViT reads them downscaled by
  14/32, the ConvNeXt at full size, as fila does), on the 1x2 canvas. Each holds a code (by default
  one digit; longer codes and distractor words are options of ``Scale``), asked for with "What is
  the code?". The code lies either wholly inside one crop or across the crop boundary, cut through
  its ink at 30-70 % of its width, on the canvas fila's own ``plan_canvas`` picks for the page,
  checked with the geometry ``fila eval --task fragmentation`` uses (``crops_touched``).
- A prediction is the greedy decoding of the answer. It is computed teacher-forced in one forward
  pass: greedy decoding returns the gold answer exactly when, at every answer position (and at the
  end-of-sequence token), the argmax given the gold prefix is the gold token.

Rows: anyres only; hybrid concat at 4 depths (the paper's); add; cross-attention; concat at the
last depth only. Each row is trained with several seeds (the seed sets the base initialisation,
shared by every row, and the fusion's initialisation and the data order); the table shows mean and
standard deviation over seeds of the exact-match accuracy on inside and straddling answers.

Usage: python benchmarks/fragmentation.py [--seeds 3] [--steps N] [--batch-size B] [--lr LR] [--train-pages N]
       [--eval-pages N] [--rows anyres,concat4,add,xattn,concat_last] [--jobs 2] [--threads 1] [--device cpu|cuda|auto]
       [--work DIR] [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fila_cli, tests.helpers

from fila_cli.config import DEFAULT_GRID_PINPOINTS, AnyresConfig, ConvNeXtConfig, FusionConfig, save_json
from fila_cli.documents.canvas import CanvasGeometry, plan_canvas
from fila_cli.documents.page_geometry import crops_touched
from fila_cli.train.base import load_tokenizer
from fila_cli.train.chat import IGNORE_INDEX, ChatRenderer
from fila_cli.train.config import TrainConfig
from fila_cli.train.loop import train
from fila_cli.train.model import TrainModel
from fila_cli.train.prepare import load_sample_image, prepare_data

FULL_CROP_SIZE = 336  # the paper's crop; the pinpoints scale with CROP_SIZE / FULL_CROP_SIZE
PLACEMENTS = ("inside", "straddling")
QUESTION = "What is the code?"
CODE_ALPHABET = "0123456789"
WORD_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# Clearance, in ViT-canvas pixels, between an "inside" answer and every crop edge (as the generator
# of fila eval make-fragmentation), and between any two strings of a page.
CLEARANCE_PX = 4.0
# Where a boundary cuts a straddling answer, as a fraction of its ink width (a vertical boundary)
# or height (a horizontal one): well inside the glyphs, never at an edge.
CUT_ACROSS_WIDTH = (0.3, 0.7)
CUT_ACROSS_HEIGHT = (0.35, 0.65)
PLACEMENT_TRIES = 1000
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
# A seed's held-out pages come from another generator stream than its training pages.
EVAL_SEED_OFFSET = 10_000


@dataclass
class Scale:
    """The scaled-down model and page. Every width is a fraction of the paper's."""

    crop_size: int = 84  # the paper's 336 / 4: 6 x 6 patches per crop
    patch_size: int = 14
    vit_width: int = 64
    vit_layers: int = 5  # LLaVA reads hidden_states[-2]: the output of layer 4
    vit_heads: int = 4
    llm_width: int = 96
    llm_layers: int = 2
    llm_heads: int = 4
    convnext_dims: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    interaction_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # the paper's 6/12/18/23, scaled
    cross_attention_heads: int = 4
    # Page: twice as wide as high, so the canvas is the 1x2 one (the paper's 336x672 scaled): one
    # vertical crop boundary down the middle. (2x2 pages cost twice as much per sample.)
    page_canvas: tuple[int, int] = (84, 168)  # (height, width) on the ViT canvas
    # The answer: one digit, cut through the glyph when it straddles. Longer codes and distractor
    # words are supported; the from-scratch models of this budget do not learn them (see docs/reproduction.md).
    code_length: tuple[int, int] = (1, 1)
    n_words: tuple[int, int] = (0, 0)
    word_length: tuple[int, int] = (3, 5)
    # Glyph size in pixels of the generated page (the high-resolution canvas): 64 px there is 28 px
    # on the ViT canvas, a digit's ink about 12 x 15 px (a patch), 6 x 8 px in the global view.
    font_size: int = 64
    # Lattice, in ViT-canvas pixels, that the answer's drawing origin snaps to (0: anywhere). Half a
    # patch gives every glyph two phases against the patch grid: a ViT trained from scratch sees few
    # distinct pixel patterns per glyph (an easier task, still not learnt at the default budget).
    snap: float = 7.0

    def anyres(self) -> AnyresConfig:
        pinpoints = [[h * self.crop_size // FULL_CROP_SIZE, w * self.crop_size // FULL_CROP_SIZE] for h, w in DEFAULT_GRID_PINPOINTS]
        return AnyresConfig(crop_size=self.crop_size, image_grid_pinpoints=pinpoints)

    def fusion(self, variant: str, single_layer: bool) -> FusionConfig:
        return FusionConfig(variant=variant, interaction_layers=list(self.interaction_layers), single_layer=single_layer,  # type: ignore[arg-type]
                            num_heads=self.cross_attention_heads, vit_hidden_size=self.vit_width,
                            convnext=ConvNeXtConfig(arch="convnext_atto", depths=[1, 1, 1, 1], dims=list(self.convnext_dims)))


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    variant: str | None  # None: anyres only
    single_layer: bool = False


ROWS = (
    Row("anyres", "anyres only (LLaVA-NeXT)", None),
    Row("concat4", "hybrid, concat at 4 depths (paper)", "concat"),
    Row("add", "hybrid, add at 4 depths", "add"),
    Row("xattn", "hybrid, cross-attention at 4 depths", "cross_attention"),
    Row("concat_last", "hybrid, concat at the last depth only", "concat", True),
)


@dataclass
class Budget:
    """The same for every row."""

    steps: int = 250
    batch_size: int = 8
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    train_pages: int = 2000
    eval_pages: int = 200
    device: str = "cpu"  # "auto": a GPU when there is one (fila train's --device)


# -- the base model --------------------------------------------------------------------------


def build_base(directory: Path, scale: Scale, seed: int) -> Path:
    """A randomly initialised LLaVA-NeXT checkpoint (transformers' own initialisation) with a
    character tokenizer: what ``fila train --base`` reads."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from tests.helpers.tiny_train import IMAGE_TOKEN_INDEX, MISTRAL_TEMPLATE, VOCAB_SIZE, char_tokenizer
    from tests.helpers.tiny_vision import save_llava_next_checkpoint

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=scale.vit_width, intermediate_size=4 * scale.vit_width, num_hidden_layers=scale.vit_layers,
                              num_attention_heads=scale.vit_heads, image_size=scale.crop_size, patch_size=scale.patch_size,
                              hidden_act="quick_gelu", projection_dim=scale.vit_width)
    text = LlamaConfig(hidden_size=scale.llm_width, intermediate_size=4 * scale.llm_width, num_hidden_layers=scale.llm_layers,
                       num_attention_heads=scale.llm_heads, num_key_value_heads=scale.llm_heads, vocab_size=VOCAB_SIZE,
                       max_position_embeddings=2048, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=scale.anyres().image_grid_pinpoints,
                             vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_index=IMAGE_TOKEN_INDEX)
    save_llava_next_checkpoint(LlavaNextForConditionalGeneration(config).eval(), directory)
    char_tokenizer(MISTRAL_TEMPLATE).save_pretrained(str(directory))
    return directory


# -- the pages ---------------------------------------------------------------------------------


@dataclass
class PageRow:
    question_id: str
    image: str
    answer: str
    placement: str
    cut: str | None
    answer_box_on_canvas: list[float]  # (x0, y0, x1, y1), ViT canvas pixels
    crops: list[int]  # the crops the answer's ink overlaps


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font: no font files needed


def _ink_box(font: ImageFont.FreeTypeFont, text: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the text's ink relative to where PIL is told to draw it."""
    return font.getbbox(text)


def _to_canvas(geometry: CanvasGeometry, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    (orig_h, orig_w), (res_h, res_w) = geometry.original_size, geometry.resized_size
    sx, sy = res_w / orig_w, res_h / orig_h
    return (geometry.pad_left + box[0] * sx, geometry.pad_top + box[1] * sy,
            geometry.pad_left + box[2] * sx, geometry.pad_top + box[3] * sy)


def _overlaps(a, b, pad: float) -> bool:
    return a[0] - pad < b[2] and b[0] - pad < a[2] and a[1] - pad < b[3] and b[1] - pad < a[3]


def _place_answer(size: tuple[int, int], ink: tuple[float, float], placement: str, geometry: CanvasGeometry,
                  rng: random.Random) -> tuple[float, float, str | None]:
    """(x0, y0) of the answer's ink box on the page (page pixels), and the cut."""
    _, page_w = size
    ink_w, ink_h = ink
    to_page = page_w / geometry.resized_size[1]  # page pixels per canvas pixel (square pixels)
    crop = geometry.crop_size * to_page
    rows, cols = geometry.grid
    margin = CLEARANCE_PX * to_page
    if placement == "inside":
        row, col = rng.randrange(rows), rng.randrange(cols)
        x = rng.uniform(col * crop + margin, (col + 1) * crop - margin - ink_w)
        y = rng.uniform(row * crop + margin, (row + 1) * crop - margin - ink_h)
        return x, y, None
    cut = rng.choice(["vertical"] * (cols > 1) + ["horizontal"] * (rows > 1))
    if cut == "vertical":
        x = rng.randrange(1, cols) * crop - rng.uniform(*CUT_ACROSS_WIDTH) * ink_w
        row = rng.randrange(rows)
        return x, rng.uniform(row * crop + margin, (row + 1) * crop - margin - ink_h), cut
    y = rng.randrange(1, rows) * crop - rng.uniform(*CUT_ACROSS_HEIGHT) * ink_h
    col = rng.randrange(cols)
    return rng.uniform(col * crop + margin, (col + 1) * crop - margin - ink_w), y, cut


def _placed_as_asked(ink_on_page, placement: str, cut: str | None, geometry: CanvasGeometry) -> bool:
    """Inside: one crop, CLEARANCE_PX from its edges. Straddling: two crops, the boundary cutting the
    ink within CUT_ACROSS_WIDTH / CUT_ACROSS_HEIGHT."""
    x0, y0, x1, y1 = _to_canvas(geometry, ink_on_page)
    crops = crops_touched((x0, y0, x1, y1), geometry)
    if placement == "inside":
        c = CLEARANCE_PX
        return len(crops) == 1 and len(crops_touched((x0 - c, y0 - c, x1 + c, y1 + c), geometry)) == 1
    if len(crops) != 2:
        return False
    size = geometry.crop_size
    if cut == "vertical":
        boundary = (x1 // size) * size
        return CUT_ACROSS_WIDTH[0] <= (boundary - x0) / (x1 - x0) <= CUT_ACROSS_WIDTH[1]
    boundary = (y1 // size) * size
    return CUT_ACROSS_HEIGHT[0] <= (boundary - y0) / (y1 - y0) <= CUT_ACROSS_HEIGHT[1]


def make_page(path: Path, index: int, placement: str, scale: Scale, anyres: AnyresConfig, highres: int,
              rng: random.Random) -> PageRow:
    """One page: the code placed as asked, distractor words elsewhere. Written at the
    high-resolution canvas size (fila reads image pixels as they are)."""
    canvas_h, canvas_w = scale.page_canvas
    size = (canvas_h * highres // scale.crop_size, canvas_w * highres // scale.crop_size)  # page pixels
    geometry = plan_canvas(size, anyres)
    font = _font(scale.font_size)
    code = "".join(rng.choice(CODE_ALPHABET) for _ in range(rng.randint(*scale.code_length)))
    left, top, right, bottom = _ink_box(font, code)
    for _ in range(PLACEMENT_TRIES):
        x, y, cut = _place_answer(size, (right - left, bottom - top), placement, geometry, rng)
        if scale.snap:  # the glyphs' drawing origin on a lattice: the same pixels at every position
            snap = scale.snap * size[1] / geometry.resized_size[1]  # page pixels
            x, y = round((x - left) / snap) * snap + left, round((y - top) / snap) * snap + top
        answer_ink = (x, y, x + right - left, y + bottom - top)
        if _placed_as_asked(answer_ink, placement, cut, geometry):
            break
    else:
        raise RuntimeError(f"page {index}: no {placement} place for {code!r}; make the font smaller or the lattice finer")
    image = Image.new("RGB", (size[1], size[0]), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((x - left, y - top), code, font=font, fill=INK)
    taken = [answer_ink]
    pad = CLEARANCE_PX * size[1] / geometry.resized_size[1]
    for _ in range(rng.randint(*scale.n_words)):
        word = "".join(rng.choice(WORD_ALPHABET) for _ in range(rng.randint(*scale.word_length)))
        wl, wt, wr, wb = _ink_box(font, word)
        for _ in range(PLACEMENT_TRIES):
            wx, wy = rng.uniform(pad, size[1] - pad - (wr - wl)), rng.uniform(pad, size[0] - pad - (wb - wt))
            box = (wx, wy, wx + wr - wl, wy + wb - wt)
            if not any(_overlaps(box, other, pad) for other in taken):
                draw.text((wx - wl, wy - wt), word, font=font, fill=INK)
                taken.append(box)
                break
    image.save(path)
    on_canvas = _to_canvas(geometry, answer_ink)
    crops = crops_touched(on_canvas, geometry)
    # The definition of the benchmark, checked on every page: one crop inside, two straddling.
    expected = 1 if placement == "inside" else 2
    if len(crops) != expected:
        raise AssertionError(f"page {index}: a {placement} answer touches crops {crops}")
    return PageRow(f"p{index:05d}", path.name, code, placement, cut, [round(v, 2) for v in on_canvas], crops)


def make_pages(directory: Path, n: int, seed: int, scale: Scale) -> tuple[Path, list[PageRow]]:
    """``n`` pages (placements alternating) and their LLaVA conversation file; returns (data file, rows)."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    anyres = scale.anyres()
    highres = int(scale.crop_size * scale.fusion("concat", False).convnext.input_scale())
    rng = random.Random(seed)
    rows = [make_page(images / f"{i:05d}.png", i, PLACEMENTS[i % 2], scale, anyres, highres, rng) for i in range(n)]
    records = [{"id": row.question_id, "image": row.image,
                "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": row.answer}]}
               for row in rows]
    data = directory / "data.json"
    data.write_text(json.dumps(records))
    (directory / "pages.jsonl").write_text("".join(json.dumps(asdict(row)) + "\n" for row in rows))
    return data, rows


# -- training and evaluation -------------------------------------------------------------------


def train_row(row: Row, seed: int, base: Path, data: Path, work: Path, scale: Scale, budget: Budget) -> tuple[TrainModel, float]:
    """One row, one seed, through fila train's loop; returns (the trained model, its last loss)."""
    fusion_config = None
    if row.variant is not None:
        fusion_config = work / f"fusion-{row.name}.json"  # what --fusion-config reads
        save_json(scale.fusion(row.variant, row.single_layer), fusion_config)
    config = TrainConfig(
        stage=2, data=str(data), images=str(data.parent / "images"), base=str(base), out=str(work / "runs" / f"{row.name}-seed{seed}"),
        fusion_config=str(fusion_config) if fusion_config else None, fusion=row.variant is not None,
        train_vit=True, train_convnext=row.variant is not None, full_llm=True, export=False,
        lr=budget.lr, warmup_ratio=budget.warmup_ratio, weight_decay=budget.weight_decay, batch_size=budget.batch_size,
        epochs=math.ceil(budget.steps * budget.batch_size / budget.train_pages), max_steps=budget.steps, seed=seed,
        gradient_checkpointing=False, save_every=budget.steps, log_every=10, device=budget.device)
    result = train(config)
    assert result.model is not None
    return result.model, result.final_loss or float("nan")


def read_placements(directory: Path) -> dict[str, str]:
    """question id -> placement, from the pages.jsonl make_pages wrote."""
    rows = [json.loads(line) for line in (directory / "pages.jsonl").read_text().splitlines()]
    return {row["question_id"]: row["placement"] for row in rows}


@torch.no_grad()
def evaluate(model: TrainModel, base: Path, data: Path, batch_size: int) -> dict[str, dict[str, float]]:
    """Exact match (greedy decoding, computed teacher-forced) and character accuracy per placement."""
    model.eval()
    prepared = prepare_data(data, data.parent / "images", ChatRenderer(load_tokenizer(base)), model.vision, 4096, warn=print)
    if prepared.n_skipped:
        raise RuntimeError(f"{prepared.n_skipped} held-out samples were skipped")
    placement_of = read_placements(data.parent)
    scores: dict[str, list[tuple[bool, float]]] = {p: [] for p in PLACEMENTS}
    for first in range(0, len(prepared.samples), batch_size):
        samples = prepared.samples[first : first + batch_size]
        sequences = [model.sequence(s, load_sample_image(s, model.vision)) for s in samples]
        longest = max(e.shape[0] for e, _ in sequences)
        device = sequences[0][0].device
        inputs = torch.zeros(len(samples), longest, sequences[0][0].shape[1], device=device)
        mask = torch.zeros(len(samples), longest, dtype=torch.long, device=device)
        for i, (embeddings, _) in enumerate(sequences):
            inputs[i, : embeddings.shape[0]], mask[i, : embeddings.shape[0]] = embeddings, 1
        predicted = model.llm(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits.argmax(-1)  # [B, L]
        for i, (sample, (_, labels)) in enumerate(zip(samples, sequences)):
            targets = labels[1:]  # position t predicts token t + 1
            answer = targets != IGNORE_INDEX  # the answer's tokens and the end of sequence
            correct = (predicted[i, : targets.shape[0]][answer] == targets[answer]).cpu()
            scores[placement_of[sample.conversation.sample_id]].append((bool(correct.all()), correct.float().mean().item()))
    return {p: {"exact": sum(e for e, _ in s) / len(s), "chars": sum(c for _, c in s) / len(s), "n": len(s)}
            for p, s in scores.items()}


@dataclass(frozen=True)
class Task:
    """One row and one seed: what a worker process trains and evaluates."""

    row: Row
    seed: int
    base: Path
    train_data: Path
    eval_data: Path
    work: Path
    scale: Scale
    budget: Budget
    threads: int


def train_and_evaluate(task: Task) -> dict:
    # Tiny matrices gain little from a second thread; on a shared CPU, processes of one thread each
    # (--jobs) use the cores better than threads that wait on each other.
    # Restored after: run in the caller's process (--jobs 1), the setting would outlive the task.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        started = time.perf_counter()
        model, loss = train_row(task.row, task.seed, task.base, task.train_data, task.work, task.scale, task.budget)
        scores: dict = evaluate(model, task.base, task.eval_data, task.budget.batch_size)
    finally:
        torch.set_num_threads(threads_before)
    scores.update(row=task.row.name, seed=task.seed, final_loss=loss, seconds=time.perf_counter() - started)
    print(f"seed {task.seed} {task.row.name:<12} loss {loss:.3f}  inside {scores['inside']['exact']:.1%}  "
          f"straddling {scores['straddling']['exact']:.1%}  ({scores['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return scores


# -- the table -----------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:5.1f} ± {100 * std:4.1f}"


def table(results: dict[str, list[dict]], rows: list[Row]) -> str:
    header = ("model", "inside EM %", "straddling EM %", "gap (pts)", "inside chars %", "straddling chars %")
    lines = []
    for row in rows:
        runs = results[row.name]
        gap = [r["inside"]["exact"] - r["straddling"]["exact"] for r in runs]
        lines.append((row.label, mean_std([r["inside"]["exact"] for r in runs]), mean_std([r["straddling"]["exact"] for r in runs]),
                      mean_std(gap), mean_std([r["inside"]["chars"] for r in runs]), mean_std([r["straddling"]["chars"] for r in runs])))
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join(out)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def run(work: Path, seeds: list[int], rows: list[Row], scale: Scale, budget: Budget, jobs: int = 1, threads: int = 1,
        log=print) -> dict:
    started = time.perf_counter()
    load_before = load_average()
    train_data, _ = make_pages(work / "train", budget.train_pages, seeds[0], scale)
    eval_data, _ = make_pages(work / "eval", budget.eval_pages, seeds[0] + EVAL_SEED_OFFSET, scale)
    log(f"pages: {budget.train_pages} training, {budget.eval_pages} held out ({time.perf_counter() - started:.0f} s)")
    tasks = [Task(row, seed, build_base(work / f"base-seed{seed}", scale, seed), train_data, eval_data, work, scale, budget, threads)
             for seed in seeds for row in rows]
    if jobs == 1:
        finished = [train_and_evaluate(task) for task in tasks]
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            finished = list(pool.map(train_and_evaluate, tasks))
    results: dict[str, list[dict]] = {row.name: [r for r in finished if r["row"] == row.name] for row in rows}
    return {"results": results, "wall_s": time.perf_counter() - started, "load_before": load_before, "load_after": load_average(),
            "seeds": seeds, "jobs": jobs, "threads": threads, "scale": asdict(scale), "budget": asdict(budget)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=Budget.steps)
    parser.add_argument("--batch-size", type=int, default=Budget.batch_size)
    parser.add_argument("--lr", type=float, default=Budget.lr)
    parser.add_argument("--train-pages", type=int, default=Budget.train_pages)
    parser.add_argument("--eval-pages", type=int, default=Budget.eval_pages)
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated: " + ", ".join(r.name for r in ROWS))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (training and evaluation)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, one process each (default: 2, one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work", type=Path, help="keep pages and runs here (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="a trivial size end to end (1 seed, 2 steps, a few pages)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object instead of the table")
    args = parser.parse_args(argv)
    budget = Budget(steps=args.steps, batch_size=args.batch_size, lr=args.lr, train_pages=args.train_pages, eval_pages=args.eval_pages,
                    device=args.device)
    seeds = list(range(args.seeds))
    if args.smoke:
        budget, seeds = Budget(steps=2, batch_size=2, train_pages=4, eval_pages=4, device=args.device), [0]
    by_name = {r.name: r for r in ROWS}
    unknown = [name for name in args.rows.split(",") if name not in by_name]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(by_name)}")
    rows = [by_name[name] for name in args.rows.split(",")]
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        report = run(work, seeds, rows, Scale(), budget, args.jobs, args.threads, log)
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report["results"], rows))
        print(f"\n{len(seeds)} seeds x {budget.steps} steps x batch {budget.batch_size}, {budget.train_pages} training pages, "
              f"{budget.eval_pages} held out; wall {report['wall_s'] / 60:.1f} min; "
              f"load average before {report['load_before']}, after {report['load_after']}; "
              f"{args.jobs} runs at once, {args.threads} torch thread(s) each")
    return report


if __name__ == "__main__":
    main()
