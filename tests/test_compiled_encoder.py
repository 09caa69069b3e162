"""``compile_for_inference``: the compiled encoder gives the eager encoder's tokens on two canvas
shapes (a new shape compiles its own graph rather than reusing a wrong one). Fusion on, so every
compiled unit runs: the ViT's layers between fusion points, the projector, the ConvNeXt."""

from __future__ import annotations

import subprocess

import pytest
import torch

from fila_cli.vision.load import load_encoder
from fila_cli.vision.model.compiled import compile_for_inference
from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.tiny_vision import PAGE_SHAPES, page_image, save_llava_next_checkpoint, tiny_llava_next
from tests.test_batch import batch_command, read_records
from tests.test_fusion import write_fusion

# Two pages whose canvases differ (a different number of views and high-resolution canvas).
PAGES = ("portrait_a4", "very_wide")
# Inductor's fused kernels round float32 differently from eager's (it may reorder a sum, fuse
# bias and activation): the same model, not the same bits.
FLOAT32_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_llava_next_checkpoint(tiny_llava_next(seed=7), tmp_path_factory.mktemp("llava"))


@pytest.mark.slow  # 158 s at load ~15 on 2 cores: torch.compile of the encoder
def test_compiled_encoder_gives_the_eager_tokens(checkpoint, tmp_path):
    weights = write_fusion(checkpoint, tmp_path / "fusion.safetensors", "concat", False, 0.5)
    eager = load_encoder(checkpoint, weights)
    compiled = compile_for_inference(load_encoder(checkpoint, weights))
    for shape in PAGES:
        image = page_image(*PAGE_SHAPES[shape], seed=3)
        expected = eager.encode(image).tokens
        for _ in range(2):  # the second call reuses the compiled graph
            got = compiled.encode(image).tokens
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, **FLOAT32_TOLERANCE)


def test_compiled_bfloat16_encoder_keeps_the_fused_cpu_attention(checkpoint, tmp_path):
    """bfloat16 on the CPU: the compiled graphs call oneDNN Graph's attention as an opaque op
    (``cpu_attention``), and stay as close to float32's tokens as bfloat16 must (2e-2, as eager
    bfloat16 in test_encoder_reference.py)."""
    from fila_cli.vision.model import cpu_attention
    from tests.test_encoder_reference import relative_error

    weights = write_fusion(checkpoint, tmp_path / "fusion.safetensors", "concat", False, 0.5)
    eager = load_encoder(checkpoint, weights, dtype=torch.bfloat16)
    full = load_encoder(checkpoint, weights)
    compiled = compile_for_inference(load_encoder(checkpoint, weights, dtype=torch.bfloat16))
    cpu_attention._cores.clear()
    image = page_image(*PAGE_SHAPES[PAGES[0]], seed=3)
    eager.encode(image)
    assert cpu_attention._cores, "the eager bfloat16 encoder did not take the fused attention"
    cpu_attention._cores.clear()
    from torch._dynamo.utils import counters

    counters.clear()
    got = compiled.encode(image).tokens
    assert cpu_attention._cores, "the compiled graph did not call the fused attention"
    assert not counters["graph_break"], dict(counters["graph_break"])  # the op kept whole, inside the graphs
    assert relative_error(got, full.encode(image).tokens) <= 2e-2


def test_fila_batch_compile_answers_as_without(bundle, tmp_path):
    """`fila batch --compile`: the option reaches the encoder (no other change of the records)."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    make_good_pdf(folder / "invoice.pdf", ["Invoice 17", "The total due is 310.00 EUR"])
    page_image(500, 1400).save(folder / "scan.png")  # another canvas shape: a second compiled graph
    records = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / f"{name}.jsonl"
        completed = subprocess.run(batch_command(bundle, folder, "-q", "What is the total due?", "--no-cache", "-o", out,
                                                 *extra), capture_output=True, text=True, timeout=900)
        assert completed.returncode == 0, completed.stderr
        records[name] = read_records(out)
    assert [(r["file"], r["answer"], r["error"]) for r in records["compiled"]] == \
           [(r["file"], r["answer"], r["error"]) for r in records["eager"]]
    # The tokens agree to ~1e-5 (above); the tiny random LLM's probabilities move by up to a few tenths of a
    # percent with them (measured 0.2 %).
    for compiled, eager in zip(records["compiled"], records["eager"]):
        assert compiled["confidence"] == pytest.approx(eager["confidence"], rel=1e-2)
