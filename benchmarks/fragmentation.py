"""Does the Hybrid Encoder recover text that an anyres crop boundary cuts? A small-scale reproduction.

FILA's claim (its Figure 1) is that text cut in two by LLaVA-NeXT's crop boundaries is read better
once the whole-page ConvNeXt branch is fused into the ViT. The paper does not train from scratch:
it starts from a CLIP ViT that can already read and a trained LLaVA-NeXT. So does this script, in
three stages, on one-digit codes drawn on pages of the 1x2 anyres canvas (84-pixel crops, 14-pixel
patches: the paper's canvases x 1/4), whose digit lies inside one crop or is cut by the crop
boundary at 30-70 % of its width:

- **Stage 0, reading** (standing in for CLIP and ImageNet pretraining). A dense corpus of pages
  with 4-12 random digits, labelled on the patch grid (a digit's label on the patch holding its
  box centre, "ignore" on the other patches its box touches, "none" elsewhere). The tiny ViT, read
  at its feature layer, learns it through a per-patch linear head; the atto-shaped ConvNeXt through
  a per-cell head on its stage-4 map (one cell per ViT patch). The heads are benchmark-only and
  thrown away. The ViT is written into a LLaVA-NeXT checkpoint (fila's ``save_base_checkpoint``),
  the ConvNeXt as timm safetensors (what ``fila train --convnext`` reads). A second ConvNeXt learns
  from the page at the ViT canvas's resolution (for the canvas x 1 arm).
- **Stage 1, the LLaVA base**, one per seed: ViT frozen, projector and LLM trained on the task pages
  by ``fila train``'s loop (``fusion=False``), written back as a LLaVA-NeXT checkpoint (``--save-base``).
- **Stage 2, the arms**, each from its seed's base, through ``fila train``'s loop: anyres only
  (trained further, the same budget), and hybrids whose CVFM starts from zero with its own learning
  rate (``--fusion-lr``) next to the pretrained, frozen ConvNeXt. Controls: the ConvNeXt sees a blank
  page (extra parameters, no extra view); the ConvNeXt sees the page no sharper than the crops
  (canvas x 1); the ConvNeXt sees each crop alone (a global view told apart from extra capacity).

Everything between the pixels and the LLM is fila's own: ``HybridEncoder`` (anyres cropping and
packing, the ConvNeXt on the high-resolution canvas, alignment, CVFM), trained through
``fila_cli.train.loop.train`` on cached page tensors (``cache_pages``) in batches. The pages are
checked against fila's own geometry (``plan_canvas``, ``crops_touched``).

A prediction is the greedy decoding of the answer, computed teacher-forced in one forward pass:
greedy decoding returns the gold answer exactly when, at every answer position and at the end of
sequence, the argmax given the gold prefix is the gold token. Character accuracy is the share of
those positions right.

Usage: python benchmarks/fragmentation.py [--seeds 3] [--arms base,anyres,concat4,...] [--jobs 2]
       [--device cpu|cuda|auto] [--work DIR] [--figure PNG] [--smoke] [--json] [budget options, see --help]
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
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fila_cli, tests.helpers

from fila_cli.config import DEFAULT_GRID_PINPOINTS, AnyresConfig, ConvNeXtConfig, FusionConfig, save_json
from fila_cli.documents.canvas import CanvasGeometry, plan_canvas
from fila_cli.documents.page_geometry import crops_touched
from fila_cli.train.base import BASE_DIR, load_llm, load_tokenizer, save_base_checkpoint
from fila_cli.train.chat import IGNORE_INDEX, ChatRenderer
from fila_cli.train.config import TrainConfig
from fila_cli.train.loop import train
from fila_cli.train.model import TrainModel
from fila_cli.train.prepare import prepare_data, render_pages
from fila_cli.vision.anyres import normalize, render_uint8
from fila_cli.vision.load import build_encoder
from fila_cli.vision.loaders.hf_safetensors import load_hf_vision
from fila_cli.vision.model.convnext_branch import ConvNeXtBranch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FIGURE = REPO / "docs" / "images" / "fragmentation.png"
FULL_CROP_SIZE = 336  # the paper's crop; the pinpoints scale with crop_size / FULL_CROP_SIZE
PLACEMENTS = ("inside", "straddling")
QUESTION = "What is the code?"
CODE_ALPHABET = "0123456789"
# Clearance, in ViT-canvas pixels, between an "inside" answer and every crop edge (as fila eval
# make-fragmentation), and between two digits of a dense page.
CLEARANCE_PX = 4.0
# Where the boundary cuts a straddling answer, as a fraction of its ink width.
CUT_ACROSS_WIDTH = (0.3, 0.7)
PLACEMENT_TRIES = 1000
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
# A run's held-out pages and its reading corpus come from other generator streams than its training pages.
EVAL_SEED_OFFSET, DENSE_SEED_OFFSET = 10_000, 20_000
# Stage-0 labels on the patch grid: a digit 0-9 where its box centre lies, NONE elsewhere.
NONE_LABEL = len(CODE_ALPHABET)
N_LABELS = NONE_LABEL + 1
# Share of the reading corpus held out to measure the stage-0 heads.
DENSE_HELD_OUT = 0.05
# Stage 0's gradient clipping (fila train's default). Without it neither reader learnt which digit
# it saw (the ViT: 14 % of held-out digits after 900 x 48 crops at lr 3e-3); with it the ViT read
# 57 % after 180 x 48 at 1e-3.
MAX_GRAD_NORM = 1.0
# Stage 0 starts the ConvNeXt's layer scales at 1: at timm's 1e-6 (made for deep ImageNet models)
# the one-block stages are nearly linear for the first hundreds of steps, and the branch learnt
# where ink is but not which digit (13 % of held-out digits after 150 x 32 pages).
LAYER_SCALE_INIT = 1.0
# Pages of the figure.
FIGURE_PAGES = 4


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
    # Atto's layout (timm's convnext_atto: stem, four stages, stride 32) at 0.4 x its widths and one
    # block per stage: what a shared 2-core CPU trains in minutes.
    convnext_depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    convnext_dims: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    interaction_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # the paper's 6/12/18/23, scaled
    cross_attention_heads: int = 4
    # Twice as wide as high: the 1x2 canvas (the paper's 336x672 scaled), one vertical boundary.
    page_canvas: tuple[int, int] = (84, 168)  # (height, width) on the ViT canvas
    # Pillow's default font at this size on the page (drawn at the ConvNeXt's resolution, 32/14
    # of the ViT canvas): a digit's ink is about 9 x 12 px on the ViT canvas, under a patch.
    font_size: int = 36
    code_length: tuple[int, int] = (1, 1)
    dense_digits: tuple[int, int] = (4, 12)  # digits per page of the reading corpus

    def anyres(self) -> AnyresConfig:
        pinpoints = [[h * self.crop_size // FULL_CROP_SIZE, w * self.crop_size // FULL_CROP_SIZE] for h, w in DEFAULT_GRID_PINPOINTS]
        return AnyresConfig(crop_size=self.crop_size, image_grid_pinpoints=pinpoints)

    def convnext(self) -> ConvNeXtConfig:
        return ConvNeXtConfig(arch="convnext_atto", depths=list(self.convnext_depths), dims=list(self.convnext_dims))

    def fusion(self, variant: str, single_layer: bool) -> FusionConfig:
        return FusionConfig(variant=variant, interaction_layers=list(self.interaction_layers), single_layer=single_layer,  # type: ignore[arg-type]
                            num_heads=self.cross_attention_heads, vit_hidden_size=self.vit_width, convnext=self.convnext())

    def page_size(self) -> tuple[int, int]:
        """(height, width) of a page in pixels: the high-resolution canvas."""
        scale = self.convnext().input_scale()
        return int(self.page_canvas[0] * scale), int(self.page_canvas[1] * scale)

    @property
    def grid(self) -> tuple[int, int]:
        """The page's ViT patch grid, (rows, cols)."""
        return self.page_canvas[0] // self.patch_size, self.page_canvas[1] // self.patch_size


@dataclass
class Budget:
    """Steps, batches and learning rates of each stage; the same for every arm."""

    dense_pages: int = 8000
    vit_steps: int = 1500
    vit_batch: int = 64  # crops
    vit_lr: float = 1e-3
    convnext_steps: int = 600
    convnext_batch: int = 32  # pages
    convnext_lr: float = 2e-3
    train_pages: int = 6000
    eval_pages: int = 600
    base_steps: int = 300
    arm_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3  # the projector (and the base's LLM)
    llm_lr: float = 3e-4  # the LLM in the arms
    fusion_lr: float = 1e-2  # CVFM in the arms (--fusion-lr)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    device: str = "cpu"


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    variant: str | None  # None: anyres only
    single_layer: bool = False
    # What the ConvNeXt sees: the page ("page"), a blank page, the page no sharper than the ViT
    # canvas ("canvas1", with the ConvNeXt pretrained so), or each crop alone.
    view: str = "page"
    required: bool = True


ARMS = (
    Arm("base", "LLaVA base (stage 1)", None),
    Arm("anyres", "anyres only, trained further", None),
    Arm("concat4", "hybrid, concat at 4 depths (paper)", "concat"),
    Arm("blank", "control: ConvNeXt sees a blank page", "concat", view="blank"),
    Arm("canvas1", "ConvNeXt at canvas x 1 (no sharper than crops)", "concat", view="canvas1"),
    Arm("add", "hybrid, add at 4 depths", "add", required=False),
    Arm("xattn", "hybrid, cross-attention at 4 depths", "cross_attention", required=False),
    Arm("concat_last", "hybrid, concat at the last depth only", "concat", True, required=False),
    Arm("per_crop", "ConvNeXt sees each crop alone", "concat", view="per_crop", required=False),
)


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


def _to_canvas(geometry: CanvasGeometry, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    (orig_h, orig_w), (res_h, res_w) = geometry.original_size, geometry.resized_size
    sx, sy = res_w / orig_w, res_h / orig_h
    return (geometry.pad_left + box[0] * sx, geometry.pad_top + box[1] * sy,
            geometry.pad_left + box[2] * sx, geometry.pad_top + box[3] * sy)


def _place_answer(size: tuple[int, int], ink: tuple[float, float], placement: str, geometry: CanvasGeometry,
                  rng: random.Random) -> tuple[float, float, str | None]:
    """(x0, y0) of the answer's ink box on the page (page pixels), and the cut (1xN canvases: vertical)."""
    ink_w, ink_h = ink
    to_page = size[1] / geometry.resized_size[1]  # page pixels per canvas pixel (square pixels)
    crop = geometry.crop_size * to_page
    rows, cols = geometry.grid
    margin = CLEARANCE_PX * to_page
    row = rng.randrange(rows)
    y = rng.uniform(row * crop + margin, (row + 1) * crop - margin - ink_h)
    if placement == "inside":
        col = rng.randrange(cols)
        return rng.uniform(col * crop + margin, (col + 1) * crop - margin - ink_w), y, None
    return rng.randrange(1, cols) * crop - rng.uniform(*CUT_ACROSS_WIDTH) * ink_w, y, "vertical"


def _placed_as_asked(ink_on_page, placement: str, geometry: CanvasGeometry) -> bool:
    """Inside: one crop, CLEARANCE_PX from its edges. Straddling: two crops, cut within CUT_ACROSS_WIDTH."""
    x0, y0, x1, y1 = _to_canvas(geometry, ink_on_page)
    crops = crops_touched((x0, y0, x1, y1), geometry)
    if placement == "inside":
        c = CLEARANCE_PX
        return len(crops) == 1 and len(crops_touched((x0 - c, y0 - c, x1 + c, y1 + c), geometry)) == 1
    boundary = (x1 // geometry.crop_size) * geometry.crop_size
    return len(crops) == 2 and CUT_ACROSS_WIDTH[0] <= (boundary - x0) / (x1 - x0) <= CUT_ACROSS_WIDTH[1]


def make_page(path: Path, index: int, placement: str, scale: Scale, rng: random.Random) -> PageRow:
    """One task page: the code placed as asked, written at the high-resolution canvas size (fila
    reads image pixels as they are, the ViT downscaled, the ConvNeXt at full size)."""
    size = scale.page_size()
    geometry = plan_canvas(size, scale.anyres())
    font = _font(scale.font_size)
    code = "".join(rng.choice(CODE_ALPHABET) for _ in range(rng.randint(*scale.code_length)))
    left, top, right, bottom = font.getbbox(code)
    for _ in range(PLACEMENT_TRIES):
        x, y, cut = _place_answer(size, (right - left, bottom - top), placement, geometry, rng)
        answer_ink = (x, y, x + right - left, y + bottom - top)
        if _placed_as_asked(answer_ink, placement, geometry):
            break
    else:
        raise RuntimeError(f"page {index}: no {placement} place for {code!r}; make the font smaller")
    image = Image.new("RGB", (size[1], size[0]), BACKGROUND)
    ImageDraw.Draw(image).text((x - left, y - top), code, font=font, fill=INK)
    image.save(path)
    on_canvas = _to_canvas(geometry, answer_ink)
    crops = crops_touched(on_canvas, geometry)
    # The definition of the benchmark, checked on every page: one crop inside, two straddling.
    if len(crops) != (1 if placement == "inside" else 2):
        raise AssertionError(f"page {index}: a {placement} answer touches crops {crops}")
    return PageRow(f"p{index:05d}", path.name, code, placement, cut, [round(v, 2) for v in on_canvas], crops)


def make_pages(directory: Path, n: int, seed: int, scale: Scale) -> tuple[Path, list[PageRow]]:
    """``n`` pages (placements alternating) and their LLaVA conversation file; returns (data file, rows)."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = [make_page(images / f"{i:05d}.png", i, PLACEMENTS[i % 2], scale, rng) for i in range(n)]
    records = [{"id": row.question_id, "image": row.image,
                "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": row.answer}]}
               for row in rows]
    data = directory / "data.json"
    data.write_text(json.dumps(records))
    (directory / "pages.jsonl").write_text("".join(json.dumps(asdict(row)) + "\n" for row in rows))
    return data, rows


def read_rows(directory: Path) -> dict[str, dict]:
    """question id -> the row make_pages wrote."""
    return {row["question_id"]: row for row in map(json.loads, (directory / "pages.jsonl").read_text().splitlines())}


# -- stage 0: the reading corpus and the pretrained readers -------------------------------------


def _gray(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] of a black-on-white page -> [H, W] (its three channels are equal)."""
    if not (torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])):
        raise AssertionError("a reading-corpus page is not grey")
    return pixels[0]


def make_dense_corpus(path: Path, n: int, seed: int, scale: Scale) -> Path:
    """``n`` pages of 4-12 digits, rendered by fila (``render_uint8``) on the ViT canvas and the
    high-resolution canvas, with their patch-grid labels; one safetensors file of uint8 planes."""
    rng = random.Random(seed)
    size = scale.page_size()
    anyres, highres_scale = scale.anyres(), scale.convnext().input_scale()
    font = _font(scale.font_size)
    to_canvas = scale.page_canvas[1] / size[1]
    pad = CLEARANCE_PX / to_canvas / 2  # page pixels between two digits' boxes
    rows, cols = scale.grid
    canvases, highres, labels = [], [], []
    for _ in range(n):
        image = Image.new("RGB", (size[1], size[0]), BACKGROUND)
        draw = ImageDraw.Draw(image)
        label = torch.full((rows, cols), NONE_LABEL, dtype=torch.long)
        centres: dict[tuple[int, int], int] = {}
        boxes: list[tuple[float, float, float, float]] = []
        for _ in range(rng.randint(*scale.dense_digits)):
            digit = rng.choice(CODE_ALPHABET)
            left, top, right, bottom = font.getbbox(digit)
            for _ in range(PLACEMENT_TRIES):
                x, y = rng.uniform(0, size[1] - (right - left)), rng.uniform(0, size[0] - (bottom - top))
                box = (x, y, x + right - left, y + bottom - top)
                if not any(box[0] - pad < b[2] and b[0] - pad < box[2] and box[1] - pad < b[3] and b[1] - pad < box[3] for b in boxes):
                    break
            else:
                continue  # the page is full
            boxes.append(box)
            draw.text((x - left, y - top), digit, font=font, fill=INK)
            x0, y0, x1, y1 = (v * to_canvas for v in box)
            patch = scale.patch_size
            # "ignore" on every patch the box touches; the centre's patch gets the digit below.
            label[int(y0 // patch) : math.ceil(y1 / patch), int(x0 // patch) : math.ceil(x1 / patch)] = IGNORE_INDEX
            centre = (min(int((y0 + y1) / 2 // patch), rows - 1), min(int((x0 + x1) / 2 // patch), cols - 1))
            centres[centre] = int(digit) if centre not in centres else IGNORE_INDEX  # two centres in a patch: ambiguous
        for (r, c), value in centres.items():
            label[r, c] = value
        page = render_uint8(image, anyres, highres_scale)
        canvases.append(_gray(page.canvas))
        highres.append(_gray(page.highres))  # type: ignore[arg-type]
        labels.append(label)
    save_file({"canvas": torch.stack(canvases), "highres": torch.stack(highres), "labels": torch.stack(labels)}, str(path))
    return path


def _batches(n_train: int, steps: int, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n_train, (batch,), generator=generator)


def _train_reader(read, labels: torch.Tensor, parameters, optimizer, schedule, batches, steps: int, *,
                  log_every: int, report) -> float:
    """Stage 0's loop, for either reader: per-cell cross-entropy on the labelled grid, gradients
    clipped, ``report(step, loss)`` every ``log_every`` steps. Returns the last step's loss."""
    for step, batch in enumerate(batches):
        loss = F.cross_entropy(read(batch).flatten(0, 1), labels[batch].flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, log_every) == 0:
            report(step + 1, loss.item())
    return loss.item()


def _optimise(parameters, lr: float, steps: int, weight_decay: float):
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    return optimizer, schedule


def _digit_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the patches holding a digit's centre that the head reads right."""
    digits = (labels >= 0) & (labels < NONE_LABEL)
    return (logits.argmax(-1)[digits] == labels[digits]).float().mean().item()


def to_vit_canvas_and_back(highres: torch.Tensor, scale: Scale) -> torch.Tensor:
    """The ConvNeXt's input no sharper than the ViT canvas (canvas x 1): shrunk to the ViT canvas
    and blown back up, bicubic (normalised float [B, 3, H, W] in and out)."""
    height, width = highres.shape[-2:]
    ratio = scale.convnext().input_scale()
    small = F.interpolate(highres, size=(int(height / ratio), int(width / ratio)), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)


def pretrain_vit(corpus: Path, init: Path, out: Path, scale: Scale, budget: Budget, seed: int, log) -> dict:
    """Stage 0 for the ViT: fila's CLIP tower (as built from the init checkpoint) and a per-patch
    linear head learn to read the corpus's crops; the tower is written into a LLaVA-NeXT
    checkpoint (``out``), the head thrown away."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    data = load_file(str(corpus))
    anyres = scale.anyres()
    encoder = build_encoder(load_hf_vision(init))
    tower = encoder.vit.train()
    head = nn.Linear(scale.vit_width, N_LABELS)  # benchmark-only
    s, side = scale.crop_size, scale.crop_size // scale.patch_size
    canvases, labels = data["canvas"], data["labels"]  # [N, H, W] uint8, [N, rows, cols]
    n_pages, (rows, cols) = canvases.shape[0], scale.grid
    # Every crop of every page, with its own patch labels.
    crops = canvases.reshape(n_pages, rows // side, s, cols // side, s).permute(0, 1, 3, 2, 4).reshape(-1, s, s)
    crop_labels = labels.reshape(n_pages, rows // side, side, cols // side, side).permute(0, 1, 3, 2, 4).reshape(-1, side, side)
    n_train = int(crops.shape[0] * (1 - DENSE_HELD_OUT))

    def read(batch: torch.Tensor) -> torch.Tensor:
        pixels = normalize(crops[batch][:, None].expand(-1, 3, -1, -1), anyres)
        return head(tower(pixels)[:, 1:])  # [B, side^2, labels]

    parameters = [*tower.parameters(), *head.parameters()]
    optimizer, schedule = _optimise(parameters, budget.vit_lr, budget.vit_steps, budget.weight_decay)
    held_out = torch.arange(n_train, crops.shape[0])

    def held_out_accuracy() -> float:
        with torch.no_grad():
            return _digit_accuracy(torch.cat([read(chunk) for chunk in held_out.split(256)]), crop_labels[held_out].flatten(1))

    final_loss = _train_reader(
        read, crop_labels, parameters, optimizer, schedule, _batches(n_train, budget.vit_steps, budget.vit_batch, seed),
        budget.vit_steps, log_every=budget.vit_steps // 10,
        report=lambda step, loss: log(f"stage 0 ViT step {step}/{budget.vit_steps} loss {loss:.3f} "
                                      f"held-out digits {held_out_accuracy():.1%}"))
    tower.eval()
    accuracy = held_out_accuracy()
    save_base_checkpoint(encoder, load_llm(init), init, out)
    return {"stage": "vit", "digit_accuracy": accuracy, "seconds": time.perf_counter() - started, "final_loss": final_loss}


def pretrain_convnext(corpus: Path, out: Path, scale: Scale, budget: Budget, seed: int, canvas1: bool, log) -> dict:
    """Stage 0 for the ConvNeXt: fila's ConvNeXt branch and a per-cell linear head on its stage-4
    map (one cell per ViT patch) learn to read whole pages at the high resolution (``canvas1``: no
    sharper than the ViT canvas); the branch is written as timm safetensors, the head thrown away."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    data = load_file(str(corpus))
    anyres = scale.anyres()
    branch = ConvNeXtBranch(scale.convnext()).train()
    with torch.no_grad():  # layer scale from 1, not timm's 1e-6: see LAYER_SCALE_INIT
        for block in branch.modules():
            if getattr(block, "gamma", None) is not None:
                block.gamma.fill_(LAYER_SCALE_INIT)
    head = nn.Linear(scale.convnext_dims[-1], N_LABELS)  # benchmark-only
    pages, labels = data["highres"], data["labels"]
    n_train = int(pages.shape[0] * (1 - DENSE_HELD_OUT))

    def read(batch: torch.Tensor) -> torch.Tensor:
        pixels = normalize(pages[batch][:, None].expand(-1, 3, -1, -1), anyres)
        if canvas1:
            pixels = to_vit_canvas_and_back(pixels, scale)
        cells = branch(pixels)[-1]  # [B, C, rows, cols]
        return head(cells.flatten(2).transpose(1, 2))  # [B, rows*cols, labels]

    parameters = [*branch.parameters(), *head.parameters()]
    optimizer, schedule = _optimise(parameters, budget.convnext_lr, budget.convnext_steps, budget.weight_decay)
    name = "ConvNeXt canvas x 1" if canvas1 else "ConvNeXt"
    held_out = torch.arange(n_train, pages.shape[0])

    def held_out_accuracy() -> float:
        with torch.no_grad():
            return _digit_accuracy(torch.cat([read(chunk) for chunk in held_out.split(64)]), labels[held_out].flatten(1))

    def report(step: int, loss: float) -> None:
        branch.eval()
        log(f"stage 0 {name} step {step}/{budget.convnext_steps} loss {loss:.3f} held-out digits {held_out_accuracy():.1%}")
        branch.train()

    final_loss = _train_reader(
        read, labels, parameters, optimizer, schedule, _batches(n_train, budget.convnext_steps, budget.convnext_batch, seed),
        budget.convnext_steps, log_every=budget.convnext_steps // 5, report=report)
    branch.eval()
    accuracy = held_out_accuracy()
    save_file({k: v.contiguous() for k, v in branch.model.state_dict().items()}, str(out))
    return {"stage": "convnext_canvas1" if canvas1 else "convnext", "digit_accuracy": accuracy,
            "seconds": time.perf_counter() - started, "final_loss": final_loss}


def build_init(directory: Path, scale: Scale, seed: int) -> Path:
    """A randomly initialised LLaVA-NeXT checkpoint (transformers' own initialisation) with a
    character tokenizer: the starting point before any stage."""
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


def seed_start(pretrained: Path, directory: Path, scale: Scale, seed: int) -> Path:
    """Seed ``seed``'s starting checkpoint: its own random projector and LLM, the pretrained ViT."""
    init = build_init(directory.with_name(directory.name + "-init"), scale, seed)
    encoder = build_encoder(load_hf_vision(init))
    encoder.vit.load_state_dict(build_encoder(load_hf_vision(pretrained)).vit.state_dict())
    return save_base_checkpoint(encoder, load_llm(init), init, directory)


# -- stages 1 and 2 through fila train ---------------------------------------------------------


def convnext_view(arm: Arm, scale: Scale):
    """``adapt_model`` for ``fila_cli.train.loop.train``: what the arm's ConvNeXt sees, by
    replacing the input of its stage maps (the unit ``compile_for_inference`` also swaps)."""
    if arm.view == "page":
        return None

    def adapt(model: TrainModel) -> None:
        branch = model.vision.convnext
        assert branch is not None
        stage_maps = branch.stage_maps
        if arm.view == "blank":
            white = normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8), scale.anyres())  # 1x2 pages have no padding

            def view(canvas: torch.Tensor) -> list[torch.Tensor]:
                return stage_maps(white.to(canvas).expand_as(canvas).contiguous())
        elif arm.view == "canvas1":
            def view(canvas: torch.Tensor) -> list[torch.Tensor]:
                return stage_maps(to_vit_canvas_and_back(canvas, scale))
        else:  # per crop: each crop's square of the high-resolution canvas alone, maps stitched back
            def view(canvas: torch.Tensor) -> list[torch.Tensor]:
                side = canvas.shape[-2]  # the 1x2 canvas: one row of square crops
                tiles = [stage_maps(tile) for tile in canvas.split(side, dim=-1)]
                return [torch.cat(maps, dim=-1) for maps in zip(*tiles)]
        branch.stage_maps = view

    return adapt


def train_config(work: Path, run: str, base: Path, data: Path, steps: int, seed: int, budget: Budget, **settings) -> TrainConfig:
    n_pages = len(json.loads(data.read_text()))
    return TrainConfig(
        stage=2, data=str(data), images=str(data.parent / "images"), base=str(base), out=str(work / "runs" / run),
        full_llm=True, export=False, cache_pages=True, warmup_ratio=budget.warmup_ratio, weight_decay=budget.weight_decay,
        batch_size=budget.batch_size, epochs=math.ceil(steps * budget.batch_size / n_pages), max_steps=steps, seed=seed,
        gradient_checkpointing=False, save_every=steps, log_every=10, device=budget.device, **settings)


@torch.no_grad()
def evaluate(model: TrainModel, base: Path, data: Path, batch_size: int) -> dict:
    """Exact match and character accuracy per placement, and each page's greedy answer."""
    model.eval()
    prepared = prepare_data(data, data.parent / "images", ChatRenderer(load_tokenizer(base)), model.vision, 4096, warn=print)
    if prepared.n_skipped:
        raise RuntimeError(f"{prepared.n_skipped} held-out samples were skipped")
    tokenizer = load_tokenizer(base)
    pages = render_pages(prepared.samples, model.vision)
    rows = read_rows(data.parent)
    scores: dict[str, list[tuple[bool, float]]] = {p: [] for p in PLACEMENTS}
    answers: dict[str, str] = {}
    for first in range(0, len(prepared.samples), batch_size):
        samples = prepared.samples[first : first + batch_size]
        inputs, labels, mask = model.batch(samples, [pages[s.index].normalized(model.vision.anyres, model.vision.device) for s in samples])
        predicted = model.llm(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits.argmax(-1)[:, :-1]  # [B, L-1]
        targets = labels[:, 1:]  # position t predicts token t + 1
        for i, sample in enumerate(samples):
            answer = targets[i] != IGNORE_INDEX  # the answer's tokens and the end of sequence
            correct = (predicted[i][answer] == targets[i][answer]).cpu()
            sample_id = sample.conversation.sample_id
            scores[rows[sample_id]["placement"]].append((bool(correct.all()), correct.float().mean().item()))
            answers[sample_id] = greedy_prefix(tokenizer, predicted[i][answer], targets[i][answer])
    return {**{p: {"exact": sum(e for e, _ in s) / len(s), "chars": sum(c for _, c in s) / len(s), "n": len(s)} for p, s in scores.items()},
            "answers": answers}


def greedy_prefix(tokenizer, predicted: torch.Tensor, gold: torch.Tensor) -> str:
    """What greedy decoding writes, as far as one teacher-forced pass knows it: the argmax equals
    greedy decoding's token up to and including the first one that differs from the gold answer
    (after it, greedy decoding continues from its own token); "…" marks that cut."""
    wrong = (predicted != gold).nonzero().flatten().tolist()
    known = predicted if not wrong else predicted[: wrong[0] + 1]
    text = tokenizer.decode(known.tolist(), skip_special_tokens=True)
    return text + ("…" if wrong and wrong[0] + 1 < len(predicted) else "")


# -- the tasks and their order -----------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    work: Path
    train_data: Path
    eval_data: Path
    corpus: Path
    pretrained: Path  # stage 0's ViT, in a LLaVA-NeXT checkpoint
    convnext: Path  # stage 0's ConvNeXt, timm safetensors
    convnext_canvas1: Path

    def start(self, seed: int) -> Path:
        return self.work / f"start-seed{seed}"

    def base(self, seed: int) -> Path:
        return self.work / "runs" / f"base-seed{seed}" / BASE_DIR


@dataclass(frozen=True)
class Task:
    """One unit of work for a worker process: a stage-0 pretraining, a seed's base, or an arm."""

    kind: str  # "train_pages", "eval_pages", "corpus", "vit", "convnext", "convnext_canvas1", "base", "arm"
    paths: Paths
    scale: Scale
    budget: Budget
    seed: int = 0
    arm: Arm | None = None
    threads: int = 1

    @property
    def key(self) -> str:
        return f"{self.arm.name}-seed{self.seed}" if self.arm else (f"base-seed{self.seed}" if self.kind == "base" else self.kind)

    def needs(self) -> list[str]:
        if self.kind in ("vit", "convnext", "convnext_canvas1"):
            return ["corpus"]
        if self.kind == "base":
            return ["vit", "train_pages", "eval_pages"]
        if self.kind == "arm":
            assert self.arm is not None
            convnext = (["convnext_canvas1"] if self.arm.view == "canvas1" else ["convnext"]) if self.arm.variant else []
            return [f"base-seed{self.seed}", *convnext]
        return []


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_task(task: Task) -> dict:
    # Tiny matrices gain little from a second thread; on a shared CPU, processes of one thread
    # each (--jobs) use the cores better. Restored after: run in the caller's process (--jobs 1),
    # the setting would outlive the task.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    started = time.perf_counter()
    try:
        result = _run_task(task)
    finally:
        torch.set_num_threads(threads_before)
    result.update(key=task.key, seed=task.seed, seconds=time.perf_counter() - started)
    summary = {k: v for k, v in result.items() if k in ("digit_accuracy", "final_loss")}
    for placement in PLACEMENTS:
        if placement in result:
            summary[placement] = round(result[placement]["exact"], 3)
    _log(f"done {task.key} in {result['seconds']:.0f} s: {summary}")
    return result


def _run_task(task: Task) -> dict:
    paths, scale, budget = task.paths, task.scale, task.budget
    if task.kind in ("train_pages", "eval_pages"):
        held_out = task.kind == "eval_pages"
        data = paths.eval_data if held_out else paths.train_data
        make_pages(data.parent, budget.eval_pages if held_out else budget.train_pages, task.seed + EVAL_SEED_OFFSET * held_out, scale)
        return {}
    if task.kind == "corpus":
        make_dense_corpus(paths.corpus, budget.dense_pages, task.seed + DENSE_SEED_OFFSET, scale)
        return {}
    if task.kind == "vit":
        return pretrain_vit(paths.corpus, build_init(paths.work / "stage0-init", scale, task.seed), paths.pretrained, scale, budget,
                            task.seed, _log)
    if task.kind in ("convnext", "convnext_canvas1"):
        canvas1 = task.kind == "convnext_canvas1"
        return pretrain_convnext(paths.corpus, paths.convnext_canvas1 if canvas1 else paths.convnext, scale, budget, task.seed, canvas1, _log)
    if task.kind == "base":
        start = seed_start(paths.pretrained, paths.start(task.seed), scale, task.seed)
        config = train_config(paths.work, f"base-seed{task.seed}", start, paths.train_data, budget.base_steps, task.seed, budget,
                              fusion=False, lr=budget.lr, save_base=True)
        result = train(config)
        base = paths.base(task.seed)
    else:
        arm = task.arm
        assert arm is not None
        base = paths.base(task.seed)
        settings: dict = dict(fusion=False, lr=budget.lr, llm_lr=budget.llm_lr)
        if arm.variant is not None:
            fusion_config = paths.work / f"fusion-{arm.name}.json"  # what --fusion-config reads
            save_json(task.scale.fusion(arm.variant, arm.single_layer), fusion_config)
            convnext = paths.convnext_canvas1 if arm.view == "canvas1" else paths.convnext
            settings.update(fusion=True, fusion_config=str(fusion_config), convnext=str(convnext),
                            fusion_lr=budget.fusion_lr)
        config = train_config(paths.work, f"{arm.name}-seed{task.seed}", base, paths.train_data, budget.arm_steps, task.seed, budget,
                              **settings)
        result = train(config, adapt_model=convnext_view(arm, scale))
    assert result.model is not None
    scores = evaluate(result.model, base, paths.eval_data, budget.batch_size)
    if result.model.vision.cvfm is not None:  # how far the zero-initialised gates opened
        gates = [torch.tanh(stage.residual.gate).abs().mean().item() for stage in result.model.vision.cvfm.stages.values()]
        scores["gate_mean_abs_tanh"] = gates
    scores.update(final_loss=result.final_loss, seconds_per_step=result.seconds_per_step, steps=result.steps)
    return scores


def plan(paths: Paths, scale: Scale, budget: Budget, seeds: list[int], arms: list[Arm], threads: int,
         optional_seeds: list[int] | None = None) -> list[Task]:
    """Every task, in the order they should start: stage 0, the bases, the required arms, the
    optional ones (on ``optional_seeds``, by default every seed)."""
    views = {arm.view for arm in arms if arm.variant}
    tasks = [Task(kind, paths, scale, budget, seeds[0], threads=threads) for kind in ("corpus", "train_pages", "eval_pages")]
    tasks.append(Task("vit", paths, scale, budget, threads=threads))
    if views - {"canvas1"}:
        tasks.append(Task("convnext", paths, scale, budget, threads=threads))
    if "canvas1" in views:
        tasks.append(Task("convnext_canvas1", paths, scale, budget, threads=threads))
    tasks += [Task("base", paths, scale, budget, seed, threads=threads) for seed in seeds]
    trained = [arm for arm in arms if arm.name != "base"]
    for wanted, its_seeds in ((True, seeds), (False, seeds if optional_seeds is None else optional_seeds)):
        tasks += [Task("arm", paths, scale, budget, seed, arm, threads) for seed in its_seeds for arm in trained if arm.required is wanted]
    return tasks


RESULTS_DIR = "results"


def read_results(work: Path) -> dict[str, dict]:
    """Every finished task's result, by key (each written when its task ended)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted((work / RESULTS_DIR).glob("*.json"))}


def _record(work: Path, key: str, result: dict, done: dict[str, dict]) -> None:
    (work / RESULTS_DIR).mkdir(exist_ok=True)
    (work / RESULTS_DIR / f"{key}.json").write_text(json.dumps(result))
    done[key] = result


def run_all(tasks: list[Task], jobs: int, work: Path) -> dict[str, dict]:
    """Run the tasks, each as soon as what it needs is done, ``jobs`` at a time. A task whose
    result is already in ``work`` (an earlier, interrupted run) is not run again."""
    done = read_results(work)
    tasks = [task for task in tasks if task.key not in done]
    if jobs == 1:
        for task in tasks:
            _record(work, task.key, run_task(task), done)
        return done
    pending = list(tasks)
    running: dict[Future, Task] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            for task in [t for t in pending if all(n in done for n in t.needs())][: jobs - len(running)]:
                pending.remove(task)
                running[pool.submit(run_task, task)] = task
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                _record(work, task.key, future.result(), done)
    return done


# -- the table and the figure --------------------------------------------------------------------


def mean_std(values: list[float], scale: float = 100) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean:5.1f} ± {scale * std:4.1f}"


def table(results: dict[str, list[dict]], arms: list[Arm]) -> str:
    header = ("arm", "seeds", "inside EM %", "straddling EM %", "gap (pts)", "inside chars %", "straddling chars %", "minutes / run")
    lines = []
    for arm in arms:
        runs = results.get(arm.name, [])
        if not runs:
            continue
        gap = [r["inside"]["exact"] - r["straddling"]["exact"] for r in runs]
        lines.append((arm.label, str(len(runs)), mean_std([r["inside"]["exact"] for r in runs]),
                      mean_std([r["straddling"]["exact"] for r in runs]), mean_std(gap),
                      mean_std([r["inside"]["chars"] for r in runs]), mean_std([r["straddling"]["chars"] for r in runs]),
                      f"{statistics.fmean(r['seconds'] for r in runs) / 60:.1f}"))
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join(out)


def figure(path: Path, results: dict[str, list[dict]], arms: list[Arm], eval_dir: Path, scale: Scale) -> Path:
    """A few straddling pages (the crop boundary, the code, each arm's answer with seed 0's
    model) over a bar chart of straddling exact match per arm (mean and std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [arm for arm in arms if results.get(arm.name)]
    rows = [row for row in read_rows(eval_dir).values() if row["placement"] == "straddling"]
    first_seed = {arm.name: min(results[arm.name], key=lambda r: r["seed"]) for arm in shown}
    # Pages where the arms disagree first: they show what the bars measure.
    rows.sort(key=lambda row: -len({first_seed[a.name]["answers"][row["question_id"]] for a in shown}))
    pages = rows[:FIGURE_PAGES]
    fig = plt.figure(figsize=(3.2 * max(len(pages), 1), 7.5))
    grid = fig.add_gridspec(2, max(len(pages), 1), height_ratios=[1.1, 1.0])
    boundary = scale.page_size()[1] // (scale.page_canvas[1] // scale.crop_size)  # page pixels per crop
    for i, row in enumerate(pages):
        axis = fig.add_subplot(grid[0, i])
        axis.imshow(Image.open(eval_dir / "images" / row["image"]), cmap="gray")
        for x in range(boundary, scale.page_size()[1], boundary):
            axis.axvline(x, color="tab:red", linewidth=1.2, linestyle="--")
        lines = [f"code {row['answer']}"] + [
            f"{arm.name}: {first_seed[arm.name]['answers'][row['question_id']] or '∅'}"
            f"{' ✓' if first_seed[arm.name]['answers'][row['question_id']] == row['answer'] else ' ✗'}" for arm in shown]
        axis.set_title("\n".join(lines), fontsize=7, loc="left", family="monospace")
        axis.set_xticks([])
        axis.set_yticks([])
    bars = fig.add_subplot(grid[1, :])
    means = [100 * statistics.fmean(r["straddling"]["exact"] for r in results[a.name]) for a in shown]
    stds = [100 * statistics.stdev(r["straddling"]["exact"] for r in results[a.name]) if len(results[a.name]) > 1 else 0 for a in shown]
    inside = [100 * statistics.fmean(r["inside"]["exact"] for r in results[a.name]) for a in shown]
    positions = range(len(shown))
    bars.bar(positions, means, yerr=stds, capsize=4, color="tab:blue", label="straddling (mean ± std over seeds)")
    bars.scatter(positions, inside, color="black", marker="_", s=200, zorder=3, label="inside (mean)")
    bars.set_xticks(list(positions), [f"{a.name}\n(n={len(results[a.name])})" for a in shown], fontsize=8)
    bars.set_ylabel("exact match %")
    low = min(means + inside) if means else 0
    bars.set_ylim(max(0, low - 10), 100)
    bars.legend(fontsize=8, loc="lower right")
    bars.grid(axis="y", alpha=0.3)
    fig.suptitle("Straddling digits: the crop boundary (red) cuts the code; each arm's answer (seed 0)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def run(work: Path, seeds: list[int], arms: list[Arm], scale: Scale, budget: Budget, jobs: int = 1, threads: int = 1,
        figure_path: Path | None = None, log=_log, optional_seeds: list[int] | None = None) -> dict:
    started = time.perf_counter()
    load_before = load_average()
    paths = Paths(work, work / "train" / "data.json", work / "eval" / "data.json", work / "reading-corpus.safetensors",
                  work / "stage0-vit", work / "stage0-convnext.safetensors", work / "stage0-convnext-canvas1.safetensors")
    done = run_all(plan(paths, scale, budget, seeds, arms, threads, optional_seeds), jobs, work)
    return report(work, done, arms, seeds, scale, figure_path, extra={
        "wall_s": time.perf_counter() - started, "load_before": load_before, "load_after": load_average(), "jobs": jobs,
        "threads": threads, "budget": asdict(budget)})


def report(work: Path, done: dict[str, dict], arms: list[Arm], seeds: list[int], scale: Scale, figure_path: Path | None,
           extra: dict | None = None) -> dict:
    """The results of the finished tasks by arm, stage 0's, and the figure (``--report-only`` makes
    this from a work folder whose run was stopped)."""
    results = {arm.name: [done[f"{arm.name}-seed{s}"] for s in seeds if f"{arm.name}-seed{s}" in done] for arm in arms}
    stage0 = {key: done[key] for key in ("vit", "convnext", "convnext_canvas1") if key in done}
    out = {**(extra or {}), "results": results, "stage0": stage0, "seeds": seeds, "scale": asdict(scale),
           "arms": [asdict(a) for a in arms]}
    (work / "report.json").write_text(json.dumps(out, indent=1))
    if figure_path is not None and any(results.values()):
        out["figure"] = str(figure(figure_path, results, arms, work / "eval", scale))
    return out


SMOKE = Budget(dense_pages=24, vit_steps=2, vit_batch=4, convnext_steps=2, convnext_batch=2, train_pages=8, eval_pages=4,
               base_steps=2, arm_steps=2, batch_size=4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(a.name for a in ARMS), help="comma-separated: " + ", ".join(a.name for a in ARMS))
    parser.add_argument("--optional-seeds", type=int, help="seeds of the optional arms (default: --seeds)")
    for f in fields(Budget):
        if f.name != "device":
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    parser.add_argument("--code-digits", type=int, default=1, help="digits of each page's code (default: 1)")
    parser.add_argument("--llm-layers", type=int, default=Scale.llm_layers, help=f"layers of the tiny LLM (default: {Scale.llm_layers})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (training and evaluation)")
    parser.add_argument("--jobs", type=int, default=2, help="tasks at once, one process each (default: 2, one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per task")
    parser.add_argument("--work", type=Path, help="keep pages, checkpoints and runs here (default: a temporary folder)")
    parser.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, help="where the figure goes (PNG)")
    parser.add_argument("--smoke", action="store_true", help="a trivial size end to end (1 seed, 2 steps per stage, a few pages)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object instead of the table")
    parser.add_argument("--report-only", action="store_true", help="train nothing: the table and figure of what --work holds")
    args = parser.parse_args(argv)
    budget = Budget(**{f.name: getattr(args, f.name) for f in fields(Budget)})
    scale = replace(Scale(), code_length=(args.code_digits, args.code_digits), llm_layers=args.llm_layers)
    seeds = list(range(args.seeds))
    if args.smoke:
        budget, seeds = replace(SMOKE, device=args.device), [0]
    by_name = {a.name: a for a in ARMS}
    unknown = [name for name in args.arms.split(",") if name not in by_name]
    if unknown:
        parser.error(f"unknown arms {', '.join(unknown)}; choose from {', '.join(by_name)}")
    arms = [by_name[name] for name in args.arms.split(",")]
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        figure_path = work / "fragmentation.png" if args.smoke and args.figure == DEFAULT_FIGURE else args.figure
        optional_seeds = seeds[: args.optional_seeds] if args.optional_seeds is not None else seeds
        if args.report_only:
            summary = report(work, read_results(work), arms, seeds, scale, figure_path,
                             extra=json.loads((work / "report.json").read_text()) if (work / "report.json").exists() else None)
        else:
            summary = run(work, seeds, arms, scale, budget, args.jobs, args.threads, figure_path, optional_seeds=optional_seeds)
        summary["work"] = str(work)
        if args.smoke:  # what each stage wrote, for the caller to check before the folder goes
            summary["written"] = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and "images" not in p.parts)
    if args.json:
        print(json.dumps(summary))
    else:
        print(table(summary["results"], arms))
        print("\nstage 0: " + ", ".join(f"{k} {v['digit_accuracy']:.1%} of held-out digits read ({v['seconds'] / 60:.1f} min)"
                                         for k, v in summary["stage0"].items()))
        if "wall_s" in summary:
            print(f"seeds {seeds}; budget {json.dumps(summary['budget'])}; wall {summary['wall_s'] / 60:.1f} min; "
                  f"load average before {summary['load_before']}, after {summary['load_after']}; "
                  f"{summary['jobs']} tasks at once, {summary['threads']} torch thread(s) each")
    return summary


if __name__ == "__main__":
    main()
