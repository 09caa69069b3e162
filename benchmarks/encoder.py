"""Vision encoder speed: HF LLaVA-NeXT vs fila, fusion off and on, against the matmul floor.

Builds the full-size architecture with random weights (ViT-L/14-336, ConvNeXt-L, projector to
d=4096; the cost does not depend on the weights' values) and times, side by side in one run on the
same page:

- HF transformers' LLaVA-NeXT image features (float32): get_image_features, which also packs
- fila, fusion off, float32 and bfloat16
- fila, fusion on (CVFM at four depths + ConvNeXt-L over the high-resolution canvas, the ViT
  canvas x 32/14: 1536x1536 for an A4 page), bfloat16
- each bfloat16 row twice: attention through SDPA (PyTorch's CPU flash kernel) and through oneDNN
  Graph's fused kernel (``cpu_attention``, what bfloat16 on the CPU uses)
- the matmul floor of each: its FLOPs (counted by torch's FlopCounterMode) over this machine's
  measured peak matmul rate in that dtype.

Then what the high-resolution input costs before the model: one A4 PDF page (dense 9-point text)
rendered with PyMuPDF at the zoom that fills the ViT canvas (fusion off) and at the zoom that fills
the ConvNeXt's canvas (fusion on), plus anyres preprocessing of that render: best time, and the peak
resident memory it adds, in a fresh process per row (Linux: the peak RSS is reset through
/proc/self/clear_refs before the render; peak after minus resident before).

``--compile`` adds the bfloat16 rows again through ``compile_for_inference`` (torch.compile, inductor
with frozen weights), with the seconds its first call spent compiling.

Usage: python benchmarks/encoder.py [--repeats N] [--threads N] [--page-size HxW] [--compile]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
)

from fila_cli.config import AnyresConfig, FusionConfig
from fila_cli.vision.anyres import preprocess
from fila_cli.vision.model.compiled import compile_for_inference
from fila_cli.vision.model.cpu_attention import fused_cpu_attention
from fila_cli.vision.model.encoder import HybridEncoder

LLM_WIDTH = 4096
FEATURE_LAYER = 23  # hidden_states[-2] of 24 layers
MATMUL_SIDE = 2048  # square matmul used to measure the peak rate
A4_POINTS = (595, 842)
BODY_FONT_POINTS = 9  # a typical body text size: what the high-resolution branch is for


def vit_l14_336() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768)


@dataclass
class Row:
    name: str
    dtype: torch.dtype
    seconds: float
    flops: float
    compile_s: float | None = None  # the first call's time, compiling included (compiled rows)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def count_flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def peak_matmul_flops_per_s(dtype: torch.dtype, repeats: int = 5) -> float:
    a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, dtype=dtype)
    b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, dtype=dtype)
    torch.mm(a, b)  # warm-up
    seconds = timed(lambda: torch.mm(a, b), repeats)
    return 2 * MATMUL_SIDE**3 / seconds


def page_image(height: int, width: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def hf_llava_next() -> LlavaNextForConditionalGeneration:
    # A one-layer, tiny-vocabulary text model: only the vision tower and projector are timed.
    text = LlamaConfig(hidden_size=LLM_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=64)
    config = LlavaNextConfig(vision_config=vit_l14_336(), text_config=text, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_token_index=63)
    return LlavaNextForConditionalGeneration(config).eval()


def fila_encoder(fusion: bool, dtype: torch.dtype) -> HybridEncoder:
    config = FusionConfig() if fusion else None
    encoder = HybridEncoder(vit_l14_336(), FEATURE_LAYER, LLM_WIDTH, AnyresConfig(), config)
    if fusion:
        with torch.no_grad():  # open gates, so the fused path is the one computed
            for name, param in encoder.cvfm.named_parameters():
                if name.endswith("gate"):
                    param.fill_(0.1)
    return encoder.to(dtype).eval()


def a4_text_pdf(path: Path) -> Path:
    import pymupdf

    document = pymupdf.open()
    page = document.new_page(width=A4_POINTS[0], height=A4_POINTS[1])
    line = "Invoice 2024-117 total due 1,234.00 EUR payable within 30 days of receipt. " * 2
    for y in range(40, A4_POINTS[1] - 40, BODY_FONT_POINTS + 3):
        page.insert_text((36, y), line, fontsize=BODY_FONT_POINTS)
    document.save(path)
    return path


def _proc_status_bytes(field: str) -> int:
    """VmRSS / VmHWM (resident now / peak resident) of this process, Linux."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS


def _measure_render(pdf: str, highres_scale: Fraction | None, repeats: int, results) -> None:
    """Child process: render + preprocess one page; best seconds and the peak memory it adds."""
    from fila_cli.documents.document import open_document
    from fila_cli.documents.render import render_for_canvas

    config = AnyresConfig()
    with open_document(pdf) as document:
        document.page_size_points(0)
        _reset_peak_rss()
        before = _proc_status_bytes("VmRSS")
        render_s = preprocess_s = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            image = render_for_canvas(document, 0, config, highres_scale)
            rendered = time.perf_counter()
            page = preprocess(image, config, highres_scale)
            render_s = min(render_s, rendered - start)
            preprocess_s = min(preprocess_s, time.perf_counter() - rendered)
        added = _proc_status_bytes("VmHWM") - before
    convnext = page.highres.geometry.canvas_size if page.highres is not None else None
    results.put((image.size, convnext, render_s, preprocess_s, added))


def render_table(repeats: int) -> None:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        pdf = str(a4_text_pdf(Path(folder) / "a4.pdf"))
        print()
        print(f"A4 page, {BODY_FONT_POINTS}-pt text; best of {repeats}; memory: peak RSS added in a fresh process")
        print(f"{'render':<34} {'image':>10} {'ConvNeXt':>10} {'render s':>9} {'anyres s':>9} {'peak MiB':>9}")
        for name, scale in [("fusion off (fills the ViT canvas)", None), ("fusion on (x 32/14)", FusionConfig().convnext.input_scale())]:
            results = context.Queue()
            child = context.Process(target=_measure_render, args=(pdf, scale, repeats, results))
            child.start()
            size, convnext, render_s, preprocess_s, added = results.get()
            child.join()
            convnext_text = "-" if convnext is None else f"{convnext[1]}x{convnext[0]}"
            print(f"{name:<34} {size[0]:>5}x{size[1]:<4} {convnext_text:>10} {render_s:9.3f} {preprocess_s:9.3f} {added / 1024**2:9.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row (best is kept), after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--page-size", default="1123x794", help="page HxW in pixels (default: A4 at 96 dpi)")
    parser.add_argument("--render-only", action="store_true", help="only the render table (seconds, not minutes)")
    parser.add_argument("--compile", action="store_true", help="also the bfloat16 rows compiled (compile_for_inference)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.render_only:
        render_table(max(args.repeats, 3))
        return
    height, width = (int(v) for v in args.page_size.split("x"))
    image = page_image(height, width)
    page = preprocess(image, AnyresConfig())
    # Fusion on: the same page with its high-resolution canvas (the model's cost depends only on the
    # shapes, so resizing this image rather than a fresh render changes nothing timed here).
    fused_page = preprocess(image, AnyresConfig(), FusionConfig().convnext.input_scale())
    high_h, high_w = fused_page.highres.geometry.canvas_size
    print(f"page {height}x{width} -> canvas {page.geometry.canvas_size[0]}x{page.geometry.canvas_size[1]} "
          f"(ConvNeXt {high_h}x{high_w} with fusion), {page.views.shape[0]} views; {args.threads} threads; best of {args.repeats}")

    rows: list[Row] = []
    with torch.inference_mode():
        hf = hf_llava_next()
        processor = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        inputs = processor(image, return_tensors="pt")

        def run_hf(model=hf.model):  # bound now: `hf` is deleted below
            model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                        vision_feature_layer=-2, vision_feature_select_strategy="default")

        run_hf()
        rows.append(Row("HF LLaVA-NeXT get_image_features", torch.float32, timed(run_hf, args.repeats), count_flops(run_hf)))
        del run_hf, hf

        # (name, fusion, dtype, compiled); every bfloat16 row with both attention kernels.
        variants = [("fila, fusion off", False, torch.float32, False), ("fila, fusion off", False, torch.bfloat16, False),
                    ("fila, fusion on (CVFM + ConvNeXt-L)", True, torch.bfloat16, False)]
        if args.compile:
            variants += [("fila, fusion off, compiled", False, torch.bfloat16, True),
                         ("fila, fusion on, compiled", True, torch.bfloat16, True)]
        model_flops: dict[bool, float] = {}  # fusion -> FLOPs of one page
        for name, fusion, dtype, compiled in variants:
            for fused_attention in (False, True) if dtype == torch.bfloat16 else (False,):
                encoder = fila_encoder(fusion, dtype)
                if compiled:
                    encoder = compile_for_inference(encoder)

                def run_fila(encoder=encoder, page=fused_page if fusion else page):
                    encoder(page)

                with fused_cpu_attention(fused_attention):
                    first_s = timed(run_fila, 1)
                    seconds = timed(run_fila, args.repeats)
                if fusion not in model_flops:  # the eager rows come first
                    # Counted on the eager model with SDPA: the counter sees neither into a compiled
                    # graph nor into the fused attention op.
                    with fused_cpu_attention(False):
                        model_flops[fusion] = count_flops(run_fila)
                label = f"{name}, {'oneDNN' if fused_attention else 'SDPA'} attn" if dtype == torch.bfloat16 else name
                rows.append(Row(label, dtype, seconds, model_flops[fusion], first_s if compiled else None))
                del encoder

    peaks = {dtype: peak_matmul_flops_per_s(dtype) for dtype in {row.dtype for row in rows}}
    baseline = rows[0].seconds
    print()
    print(f"{'path':<50} {'dtype':<9} {'seconds':>8} {'vs HF':>7} {'GFLOP':>8} {'floor s':>8} {'x floor':>8} {'1st call s':>10}")
    for row in rows:
        floor = row.flops / peaks[row.dtype]
        dtype = str(row.dtype).removeprefix("torch.")
        first = f"{row.compile_s:10.1f}" if row.compile_s is not None else f"{'':>10}"
        print(f"{row.name:<50} {dtype:<9} {row.seconds:8.2f} {baseline / row.seconds:6.2f}x {row.flops / 1e9:8.0f} {floor:8.2f} "
              f"{row.seconds / floor:7.2f}x {first}")
    print()
    for dtype, peak in peaks.items():
        print(f"peak matmul ({MATMUL_SIDE}^3, {str(dtype).removeprefix('torch.')}): {peak / 1e9:.0f} GFLOP/s")
    render_table(max(args.repeats, 3))


if __name__ == "__main__":
    main()
