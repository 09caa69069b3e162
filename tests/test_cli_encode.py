"""`fila encode` end to end: PDF and PNG in, documented .safetensors out; bad input -> one line, exit code."""

from __future__ import annotations

import subprocess
import sys

import pymupdf
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from fila_cli.cli.app import app
from fila_cli.errors import ExitCode
from tests.helpers.tiny_vision import TINY_LLM_WIDTH, page_image, save_llava_next_checkpoint, tiny_llava_next

DOCUMENTED_METADATA = {"format", "file", "page", "image_size", "canvas", "grid", "n_tokens", "vision_weights", "fusion_weights", "dtype"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_llava_next_checkpoint(tiny_llava_next(seed=2), tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def pdf(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "report.pdf"
    document = pymupdf.open()
    for text in ("Quarterly report", "Total due: 1,234.00 EUR"):
        page = document.new_page()
        page.insert_text((72, 100), text, fontsize=24)
    document.save(path)
    return path


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def read_tokens(path):
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor("visual_tokens"), handle.metadata()


def test_encode_pdf_page(checkpoint, pdf, tmp_path):
    out = tmp_path / "page2.safetensors"
    result = run("encode", pdf, "--page", 2, "--mmproj", checkpoint, "--dtype", "float32", "-o", out)
    assert result.exit_code == 0, result.output
    tokens, metadata = read_tokens(out)
    assert set(metadata) == DOCUMENTED_METADATA
    assert metadata["page"] == "2" and metadata["fusion_weights"] == "none" and metadata["dtype"] == "float32"
    assert tokens.dtype.is_floating_point and tokens.shape == (int(metadata["n_tokens"]), TINY_LLM_WIDTH)
    # A US-letter/A4 portrait page is rendered to fill the 672x672 canvas: 2x2 crops.
    assert metadata["canvas"] == "672x672" and metadata["grid"] == "2x2"


def test_encode_png_in_a_subprocess(checkpoint, tmp_path):
    image = tmp_path / "scan.png"
    page_image(400, 1200).save(image)
    out = tmp_path / "scan.safetensors"
    completed = subprocess.run([sys.executable, "-m", "fila_cli", "encode", str(image), "--mmproj", str(checkpoint), "-o", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == ""  # results go to the file, the summary to stderr
    tokens, metadata = read_tokens(out)
    assert metadata["image_size"] == "1200x400" and metadata["canvas"] == "1008x336"
    assert tokens.shape[0] == int(metadata["n_tokens"])


def assert_one_line_error(result, exit_code, *needles):
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fila: error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


def test_missing_file(checkpoint, tmp_path):
    result = run("encode", tmp_path / "nope.pdf", "--mmproj", checkpoint, "-o", tmp_path / "o.safetensors")
    assert_one_line_error(result, ExitCode.DOCUMENT, "nope.pdf")


def test_corrupt_pdf(checkpoint, pdf, tmp_path):
    corrupt = tmp_path / "corrupt.pdf"
    corrupt.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 4)
    result = run("encode", corrupt, "--mmproj", checkpoint, "-o", tmp_path / "o.safetensors")
    assert_one_line_error(result, ExitCode.DOCUMENT, "corrupt.pdf")


def test_page_out_of_range(checkpoint, pdf, tmp_path):
    result = run("encode", pdf, "--page", 9, "--mmproj", checkpoint, "-o", tmp_path / "o.safetensors")
    assert_one_line_error(result, ExitCode.DOCUMENT, "report.pdf", "9")
    result = run("encode", pdf, "--page", 0, "--mmproj", checkpoint, "-o", tmp_path / "o.safetensors")
    assert_one_line_error(result, ExitCode.DOCUMENT, "report.pdf")


def test_wrong_weights_file(pdf, tmp_path):
    not_weights = tmp_path / "weights.safetensors"
    not_weights.write_bytes(b"this is not a safetensors file")
    result = run("encode", pdf, "--mmproj", not_weights, "-o", tmp_path / "o.safetensors")
    assert_one_line_error(result, ExitCode.MODEL, "weights.safetensors")
    result = run("encode", pdf, "--mmproj", pdf, "-o", tmp_path / "o.safetensors")
    assert_one_line_error(result, ExitCode.MODEL, "report.pdf")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("name", ["tokens.txt", "a-file.pdf/tokens.safetensors", "folder.safetensors"])
def test_a_bad_output_path_fails_before_the_model_loads(pdf, tmp_path, name):
    (tmp_path / "a-file.pdf").write_bytes(b"%PDF")
    (tmp_path / "folder.safetensors").mkdir()
    not_weights = tmp_path / "weights.safetensors"
    not_weights.write_bytes(b"this is not a safetensors file")
    # Were the weights loaded first, this would exit 4 (they are not weights): the path is checked first.
    result = run("encode", pdf, "--mmproj", not_weights, "-o", tmp_path / name)
    assert_one_line_error(result, ExitCode.USAGE, name)
