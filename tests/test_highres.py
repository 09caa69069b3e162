"""The ConvNeXt branch reads the page at high resolution, from the original pixels, aligned with the
ViT crop for crop and patch for patch (real timm, real PyMuPDF, tiny random weights)."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import pymupdf
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.models.convnext import ConvNeXt, ConvNeXtBlock

from fila_cli.config import AnyresConfig, ConvNeXtConfig
from fila_cli.documents.document import Document
from fila_cli.vision.anyres import preprocess
from fila_cli.vision.encode import encode_page
from fila_cli.vision.load import load_encoder, load_vision_weights
from fila_cli.vision.loaders.fusion_weights import save_fusion_weights
from fila_cli.vision.model.alignment import align_stage
from fila_cli.vision.model.encoder import HybridEncoder
from fila_cli.vision.token_cache import token_cache_key
from tests.helpers.bad_documents import HUGE_PAGE_POINTS, write_corpus
from tests.helpers.tiny_vision import (
    PAGE_SHAPES,
    TINY_LLM_WIDTH,
    save_llava_next_checkpoint,
    tiny_clip_config,
    tiny_fusion_config,
    tiny_llava_next,
)

A4_POINTS = (595, 842)
HIGHRES_SCALE = ConvNeXtConfig().input_scale()  # 32/14
GRID = 24  # ViT patches along a crop
PATCH = 14  # ViT patch side, pixels
# Digits this small (in points) are about 3 pixels tall on the 672 canvas: gone, but legible on the
# high-resolution canvas.
TINY_FONT_POINTS = 4
# The ConvNeXt input must hold this many times more energy above the ViT canvas's Nyquist frequency
# than the ViT canvas blown up to the same size (measured: ~70x for the 4-point page).
MIN_DETAIL_RATIO = 10.0


def small_digits_pdf(path):
    document = pymupdf.open()
    page = document.new_page(width=A4_POINTS[0], height=A4_POINTS[1])
    for y in range(30, A4_POINTS[1] - 20, TINY_FONT_POINTS + 1):
        page.insert_text((30, y), "0123456789 " * 14, fontsize=TINY_FONT_POINTS)
    document.save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_llava_next_checkpoint(tiny_llava_next(seed=3), tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def fusion_weights(checkpoint, tmp_path_factory):
    """Fusion weights as training writes them, gates open so the fused path matters."""
    weights = load_vision_weights(checkpoint)
    config = tiny_fusion_config()
    torch.manual_seed(12)
    encoder = HybridEncoder(weights.clip_config, 2, TINY_LLM_WIDTH, fusion=config)
    with torch.no_grad():
        for name, param in encoder.cvfm.named_parameters():
            if name.endswith("gate"):
                param.fill_(0.5)
    path = tmp_path_factory.mktemp("fusion") / "fusion.safetensors"
    save_fusion_weights(path, config, {k: v for k, v in encoder.state_dict().items() if k.startswith(("cvfm.", "convnext."))})
    return path


@pytest.fixture
def spies(monkeypatch):
    """Every page render (the image) and every ConvNeXt input (the tensor), recorded as they happen."""
    seen = {"renders": [], "convnext_inputs": []}
    render, forward_intermediates = Document.render_page, ConvNeXt.forward_intermediates

    def recording_render(self, *args, **kwargs):
        image = render(self, *args, **kwargs)
        seen["renders"].append(image)
        return image

    def recording_forward(self, x, *args, **kwargs):
        seen["convnext_inputs"].append(x.detach().clone())
        return forward_intermediates(self, x, *args, **kwargs)

    monkeypatch.setattr(Document, "render_page", recording_render)
    monkeypatch.setattr(ConvNeXt, "forward_intermediates", recording_forward)
    return seen


def energy_above(image: torch.Tensor, cutoff: float) -> float:
    """Spectral energy of [3, H, W] (channel mean, mean removed) at frequencies above ``cutoff``
    (cycles per pixel) along either axis."""
    gray = image.float().mean(0)
    gray = gray - gray.mean()
    power = torch.fft.fft2(gray.double()).abs() ** 2
    fy = torch.fft.fftfreq(gray.shape[0]).abs()[:, None]
    fx = torch.fft.fftfreq(gray.shape[1]).abs()[None, :]
    return power[(fy > cutoff) | (fx > cutoff)].sum().item()


def central_half(image: torch.Tensor) -> torch.Tensor:
    """The middle half of [3, H, W] along both axes: page content only, no padding edge."""
    height, width = image.shape[-2:]
    return image[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4]


def test_convnext_sees_detail_the_vit_canvas_cannot_hold(checkpoint, fusion_weights, spies, tmp_path):
    encoder = load_encoder(checkpoint, fusion_weights)
    pdf = small_digits_pdf(tmp_path / "tiny-digits.pdf")
    encode_page(pdf, 1, encoder)
    # The fusion-on path renders the page once; both branches come from that render.
    assert len(spies["renders"]) == 1 and len(spies["convnext_inputs"]) == 1
    convnext_input = spies["convnext_inputs"][0][0]  # [3, H, W]
    vit_canvas = preprocess(spies["renders"][0], encoder.anyres).canvas  # [3, 672, 672]
    blown_up = F.interpolate(vit_canvas[None], size=tuple(convnext_input.shape[-2:]), mode="bicubic", align_corners=False)[0]
    # The ViT canvas's Nyquist frequency (half a cycle per canvas pixel) in ConvNeXt-input pixels.
    cutoff = 0.5 * vit_canvas.shape[-1] / convnext_input.shape[-1]
    detail = energy_above(central_half(convnext_input), cutoff)
    blown_up_detail = energy_above(central_half(blown_up), cutoff)
    assert detail > MIN_DETAIL_RATIO * blown_up_detail, (detail, blown_up_detail)


def test_fusion_on_renders_pdf_pages_once_at_the_highres_zoom(checkpoint, fusion_weights, spies, tmp_path):
    pdf = small_digits_pdf(tmp_path / "page.pdf")
    fused = load_encoder(checkpoint, fusion_weights)
    assert fused.highres_scale == Fraction(32, 14)
    result = encode_page(pdf, 1, fused)
    (render,) = spies["renders"]
    # An A4 page fills the 1536x1536 ConvNeXt canvas by height (the 672x672 canvas x 32/14).
    assert render.height == 1536 and abs(render.width - 1536 * A4_POINTS[0] / A4_POINTS[1]) <= 1
    (convnext_input,) = spies["convnext_inputs"]
    assert tuple(convnext_input.shape[-2:]) == (1536, 1536)
    assert result.page.geometry.canvas_size == (672, 672)
    # Fusion off: no extra cost, the page is rendered to fill the ViT canvas, as before.
    plain = load_encoder(checkpoint)
    assert plain.highres_scale is None
    encode_page(pdf, 1, plain)
    assert len(spies["renders"]) == 2 and spies["renders"][1].height == 672
    assert len(spies["convnext_inputs"]) == 1  # the ConvNeXt did not run


def test_ask_and_batch_render_at_the_highres_zoom_once(fusion_weights, spies, tmp_path):
    """`fila ask` (in process) and `fila batch` (in the document worker) render with the encoder's scale."""
    from fila_cli.bundles.bundle import resolve_bundle
    from fila_cli.llm import SamplingParams
    from fila_cli.qa.ask import Asker, AskOptions
    from fila_cli.qa.isolation import DocumentWorker
    from tests.helpers.tiny_bundle import build_tiny_bundle

    directory = build_tiny_bundle(tmp_path / "bundle")
    for suffix in (".safetensors", ".json"):  # a bundle directory's fusion.safetensors turns fusion on
        (directory / f"fusion{suffix}").write_bytes(fusion_weights.with_suffix(suffix).read_bytes())
    asker = Asker.load(resolve_bundle(str(directory)))
    assert asker.encoder.highres_scale == HIGHRES_SCALE
    pdf = small_digits_pdf(tmp_path / "page.pdf")
    asker.ask(pdf, "What is the first digit?", AskOptions(sampling=SamplingParams(max_tokens=2)))
    assert [image.height for image in spies["renders"]] == [1536]
    assert [tuple(x.shape[-2:]) for x in spies["convnext_inputs"]] == [(1536, 1536)]

    worker = DocumentWorker(timeout_s=120)
    try:
        plan = worker.open(pdf, "Anything?", None, None)
        page = worker.render(pdf, plan.page_indices[0], asker.encoder.anyres, False, asker.encoder.highres_scale)
    finally:
        worker.close()
    assert page.image.size == spies["renders"][0].size


def test_a_scale_that_does_not_tile_the_patch_grid_is_refused():
    config = tiny_fusion_config()
    config.convnext.input_scale_numerator, config.convnext.input_scale_denominator = 2, 1  # 672 px: 21 cells a crop
    with pytest.raises(ValueError, match="not a multiple of 24 patches"):
        HybridEncoder(tiny_clip_config(), 2, TINY_LLM_WIDTH, fusion=config)


def test_token_cache_key_covers_the_highres_input():
    def key(scale):
        return token_cache_key("abc", 0, AnyresConfig(), 4096 * 4096, "vision", "fusion", dtype="float32", device="cpu", highres_scale=scale)
    assert key(None) != key(Fraction(32, 14)) != key(Fraction(64, 14))
    assert key(Fraction(32, 14)) == key(Fraction(16, 7))  # the same input, however the scale is written


# -- alignment, end to end, through pixels ---------------------------------------------------------

# Marker side on the ViT canvas, in pixels: with the resize kernel's spread it stays inside one
# 14-pixel patch when centred on it.
MARKER_VIT_PX = 4
# A4, a receipt, a banner and an image smaller than a crop; the last three sit on their canvases at
# offsets that are not whole ViT patches, where a rounding rule that snapped the page to whole
# stage-4 cells would move it by up to half a patch.
ALIGNMENT_SHAPES = ["portrait_a4", "very_tall", "very_wide", "tiny"]
# How far (high-resolution pixels) the marker's centre on the ConvNeXt canvas may lie from its
# centre on the ViT canvas x 32/14: the geometry's rounding (half a pixel); measured under 0.1.
MAX_CENTRE_OFFSET_PX = 0.5
BLANK = (255, 255, 255)
INK = (0, 0, 0)


def local_convnext_encoder() -> HybridEncoder:
    """A tiny hybrid encoder whose ConvNeXt is strictly local: with the blocks' layer scales at zero
    every block is the identity, leaving the stem and downsampling convolutions (kernel = stride)
    and per-position LayerNorms. Each stage cell then depends only on the pixels under it, so a
    marker's response stays in the cells under the marker."""
    torch.manual_seed(0)
    encoder = HybridEncoder(tiny_clip_config(), 2, TINY_LLM_WIDTH, fusion=tiny_fusion_config())
    with torch.no_grad():
        for module in encoder.convnext.modules():
            if isinstance(module, ConvNeXtBlock):
                module.gamma.zero_()
    return encoder.eval()


def draw_marker(image: Image.Image, center_xy: tuple[float, float], side_xy: tuple[int, int]) -> Image.Image:
    marked = image.copy()
    x0 = round(center_xy[0] - side_xy[0] / 2)
    y0 = round(center_xy[1] - side_xy[1] / 2)
    ImageDraw.Draw(marked).rectangle([x0, y0, x0 + side_xy[0] - 1, y0 + side_xy[1] - 1], fill=INK)
    return marked


def patch_energy(views: torch.Tensor) -> torch.Tensor:
    """[n, 3, 336, 336] pixel differences -> [n, 24, 24] energy per ViT patch."""
    n = views.shape[0]
    return views.double().pow(2).sum(1).reshape(n, GRID, PATCH, GRID, PATCH).sum((2, 4))


def marker_centre(difference: torch.Tensor, centre: tuple[float, float], half: int) -> tuple[float, float]:
    """Energy-weighted centre (x, y) of a [3, H, W] pixel difference within ``half`` pixels of ``centre``."""
    x0, y0 = int(centre[0]) - half, int(centre[1]) - half
    window = difference[:, y0:y0 + 2 * half, x0:x0 + 2 * half].double().pow(2).sum(0)
    ys = torch.arange(window.shape[0], dtype=torch.float64)[:, None] + y0 + 0.5
    xs = torch.arange(window.shape[1], dtype=torch.float64)[None, :] + x0 + 0.5
    return (window * xs).sum().item() / window.sum().item(), (window * ys).sum().item() / window.sum().item()


def stage_differences(encoder: HybridEncoder, marked, blank) -> list[torch.Tensor]:
    with torch.inference_mode():
        maps_marked = encoder.convnext(marked.highres.pixels[None])
        maps_blank = encoder.convnext(blank.highres.pixels[None])
    return [(m[0] - b[0]).double() for m, b in zip(maps_marked, maps_blank)]


def crop_marker_centres(geometry) -> dict[tuple[int, int], tuple[float, float]]:
    """Per crop (r, c), the ViT-canvas centre of a patch inside the page: the patch nearest the
    middle of the crop's part of the page."""
    left, top, right, bottom = geometry.image_box_on_canvas()
    centres = {}
    for index, (x0, y0, x1, y1) in enumerate(geometry.crop_boxes_on_canvas()):
        ix0, iy0, ix1, iy1 = max(x0, left), max(y0, top), min(x1, right), min(y1, bottom)
        if ix1 - ix0 < 2 * PATCH or iy1 - iy0 < 2 * PATCH:
            continue  # hardly any page in this crop
        j = int(((ix0 + ix1) / 2 - x0) // PATCH)
        i = int(((iy0 + iy1) / 2 - y0) // PATCH)
        centres[divmod(index, geometry.grid[1])] = (x0 + (j + 0.5) * PATCH, y0 + (i + 0.5) * PATCH)
    return centres


@pytest.mark.parametrize("shape", ALIGNMENT_SHAPES)
def test_a_crop_marker_lands_in_the_cells_of_its_vit_patch(shape):
    encoder = local_convnext_encoder()
    height, width = PAGE_SHAPES[shape]
    blank_image = Image.new("RGB", (width, height), BLANK)
    blank = encoder.preprocess(blank_image)
    vit = blank.geometry
    # One marker per crop, each centred on a ViT patch of its crop.
    scale_x, scale_y = vit.resized_size[1] / width, vit.resized_size[0] / height
    side = (max(1, round(MARKER_VIT_PX / scale_x)), max(1, round(MARKER_VIT_PX / scale_y)))
    marked_image = blank_image
    centres = crop_marker_centres(vit)
    assert centres, "no crop holds page"
    for x, y in centres.values():
        marked_image = draw_marker(marked_image, vit.canvas_to_original(x, y), side)
    marked = encoder.preprocess(marked_image)
    assert marked.highres.geometry == blank.highres.geometry

    # Where the ViT sees each marker: the one patch of the crop its pixels change.
    vit_energy = patch_energy(marked.views - blank.views)  # [n_views, 24, 24]
    expected_patch = {}
    for (r, c) in centres:
        view = 1 + r * vit.grid[1] + c
        i, j = divmod(int(vit_energy[view].argmax()), GRID)
        assert vit_energy[view, i, j] > 0 and vit_energy[view, i, j] == vit_energy[view].sum(), \
            "test set-up: the marker must lie inside one ViT patch"
        expected_patch[view] = i * GRID + j
    # The page's pixels on the ConvNeXt canvas sit where the ViT's are, x 32/14.
    scale = float(HIGHRES_SCALE)
    for x, y in centres.values():
        vit_x, vit_y = marker_centre(marked.canvas - blank.canvas, (x, y), PATCH // 2)
        high_x, high_y = marker_centre(marked.highres.pixels - blank.highres.pixels, (x * scale, y * scale), round(PATCH * scale) // 2)
        assert abs(high_x - vit_x * scale) <= MAX_CENTRE_OFFSET_PX and abs(high_y - vit_y * scale) <= MAX_CENTRE_OFFSET_PX

    for stage, difference in enumerate(stage_differences(encoder, marked, blank)):
        windows = align_stage(difference, marked.highres.geometry, GRID, windowed=True)  # [n_views, 576, f*f, C]
        cell_energy = windows.pow(2).sum((-1, -2))  # [n_views, 576]
        for view, patch in expected_patch.items():
            assert cell_energy[view, patch] > 0, f"stage {stage + 1}: no response in crop view {view}'s patch"
            assert cell_energy[view, patch].item() == pytest.approx(cell_energy[view].sum().item(), rel=1e-9), \
                f"stage {stage + 1}: part of the marker's response went to another patch of view {view}"
        crop_views = list(expected_patch)
        total = difference.pow(2).sum()
        assert cell_energy[crop_views].sum().item() == pytest.approx(total.item(), rel=1e-9), \
            f"stage {stage + 1}: part of the response fell in a crop the ViT does not see the marker in"


@pytest.mark.parametrize("shape", ALIGNMENT_SHAPES)
def test_a_global_marker_lands_in_the_cells_of_its_global_patch(shape):
    encoder = local_convnext_encoder()
    height, width = PAGE_SHAPES[shape]
    blank_image = Image.new("RGB", (width, height), BLANK)
    blank = encoder.preprocess(blank_image)
    # Off-centre, where counting the padding as page would move the marker by patches.
    gi, gj = 4, 19
    centre = ((gj + 0.5) * width / GRID, (gi + 0.5) * height / GRID)
    side = (max(1, round(MARKER_VIT_PX * width / (GRID * PATCH))), max(1, round(MARKER_VIT_PX * height / (GRID * PATCH))))
    marked = encoder.preprocess(draw_marker(blank_image, centre, side))

    vit_energy = patch_energy(marked.views[:1] - blank.views[:1])[0]
    assert vit_energy[gi, gj] > 0 and vit_energy[gi, gj] == vit_energy.sum(), "test set-up: one global patch"

    high = marked.highres.geometry
    left, top, right, bottom = high.image_box_on_canvas()
    for stage, (difference, stride) in enumerate(zip(stage_differences(encoder, marked, blank), ConvNeXtConfig().stage_strides)):
        pooled = align_stage(difference, high, GRID)[0]  # the global view, [576, C]
        energy = pooled.pow(2).sum(-1).reshape(GRID, GRID)
        assert energy[gi, gj] > 0, f"stage {stage + 1}: the global patch the ViT sees the marker in gets none of it"
        # The response's centre, in global patches, is the marker's to within half a patch plus one
        # stage cell (the region is rounded out to whole cells).
        rows_cells = -(-bottom // stride) - top // stride
        cols_cells = -(-right // stride) - left // stride
        weights = energy / energy.sum()
        centre_i = (weights.sum(1) * (torch.arange(GRID) + 0.5)).sum().item()
        centre_j = (weights.sum(0) * (torch.arange(GRID) + 0.5)).sum().item()
        assert abs(centre_i - (gi + 0.5)) <= 0.5 + GRID / rows_cells, (stage, centre_i)
        assert abs(centre_j - (gj + 0.5)) <= 0.5 + GRID / cols_cells, (stage, centre_j)


# -- memory under the pixel cap ---------------------------------------------------------------------

# Peak resident memory one fusion-on page may add (render + both canvases + the tiny models' maps):
# the 1536x1536 canvas is ~30 MB of float32; the bound leaves room for allocator slack, and an
# uncapped render of a 200x200-inch page (60000x60000 px at 300 dpi) would need gigabytes.
MAX_PAGE_MEMORY_BYTES = 512 * 1024**2

# Linux: the peak resident size is reset (/proc/self/clear_refs) once the models are loaded, so the
# peak read at the end is the page's own, not the imports'.
_MEMORY_PROBE = """
import json, sys
from fila_cli.documents.document import open_document
from fila_cli.documents.render import render_for_canvas
from fila_cli.vision.load import load_encoder

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

encoder = load_encoder(sys.argv[1], sys.argv[2])
with open_document(sys.argv[3]) as document:
    document.page_size_points(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = status("VmRSS")
    image = render_for_canvas(document, 0, encoder.anyres, encoder.highres_scale)
page = encoder.preprocess(image)
tokens = encoder.encode(image).tokens
print(json.dumps({"image": list(image.size), "highres": list(page.highres.geometry.canvas_size),
                  "tokens": list(tokens.shape), "added_bytes": status("VmHWM") - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
def test_a_huge_page_stays_bounded_with_fusion_on(checkpoint, fusion_weights, tmp_path):
    huge = write_corpus(tmp_path / "corpus")["huge_page.pdf"].path
    with pymupdf.open(huge) as document:
        assert document[0].rect.width == HUGE_PAGE_POINTS  # the 200x200-inch page
    probe = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(checkpoint), str(fusion_weights), str(huge)],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    # Rendered to fill the 1536x1536 ConvNeXt canvas, not at the page's own enormous size.
    assert report["highres"] == [1536, 1536] and max(report["image"]) <= 1536
    assert 0 < report["added_bytes"] < MAX_PAGE_MEMORY_BYTES, report
    assert report["tokens"][1] == TINY_LLM_WIDTH
