"""Documents in, pages out: the bad-document corpus, page selection syntax, passwords, images, hashes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image

from fila_cli.documents.document import (
    DEFAULT_MAX_PIXELS,
    file_sha256,
    open_document,
    page_index_from_user,
    parse_page_spec,
)
from fila_cli.errors import DocumentError, UsageError
from tests.helpers.bad_documents import (
    HUGE_PAGE_POINTS,
    MANY_PAGES,
    PASSWORD,
    SAMPLE_TEXTS,
    make_good_pdf,
    pdf_bytes,
    text_pdf_bytes,
    write_corpus,
)

REPO = Path(__file__).resolve().parents[1]
RENDER_SCALE = 2.0
# Generous: each case takes well under a second alone, but the test machine is shared.
CASE_SECONDS = 5.0
# Peak memory the whole corpus may add over the process's baseline. Unbounded, the huge page alone
# would be 28800 x 28800 RGB (2.4 GB) and the bomb PDF's image 1 GB.
MEMORY_BUDGET_MB = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _outcome(path: Path) -> tuple[str, Image.Image | None]:
    """("ok", page 1's render) or ("document", None); any other exception propagates."""
    try:
        with open_document(path) as document:
            return "ok", document.render_page(0, RENDER_SCALE)
    except DocumentError:
        return "document", None


# -- the corpus ------------------------------------------------------------------------------------


CORPUS_NAMES = [
    "truncated_tail.pdf",
    "truncated_head.pdf",
    "bit_flipped.pdf",
    "broken_xref.pdf",
    "zero_pages.pdf",
    "encrypted.pdf",
    "huge_page.pdf",
    "many_pages.pdf",
    "javascript_attachment.pdf",
    "bomb.png",
    "bomb_warning.png",
    "bomb_image.pdf",
    "truncated.png",
    "text_named.pdf",
    "header_only.pdf",
    "empty.pdf",
]


def test_corpus_lists_every_case(corpus):
    assert sorted(corpus) == sorted(CORPUS_NAMES)


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_case_gives_expected_outcome_quickly(corpus, name):
    case = corpus[name]
    start = time.perf_counter()
    # Any exception other than DocumentError escapes _outcome and fails the test.
    outcome, image = _outcome(case.path)
    elapsed = time.perf_counter() - start
    assert outcome == case.expected
    assert elapsed < CASE_SECONDS, f"{name} took {elapsed:.1f} s"
    if image is not None:
        assert image.mode == "RGB"
        assert image.width * image.height <= DEFAULT_MAX_PIXELS


def test_document_error_messages_are_one_line_and_name_the_file(corpus):
    refused = {name: case for name, case in corpus.items() if case.expected == "document"}
    assert len(refused) >= 8
    for case in refused.values():
        with pytest.raises(DocumentError) as caught:
            with open_document(case.path) as document:
                document.render_page(0, RENDER_SCALE)
        message = str(caught.value)
        assert "\n" not in message
        assert str(case.path) in message


def test_corpus_messages_say_what_happened(corpus):
    def message(name: str) -> str:
        with pytest.raises(DocumentError) as caught:
            with open_document(corpus[name].path) as document:
                document.render_page(0, RENDER_SCALE)
        return str(caught.value)

    assert "is encrypted: pass --password" in message("encrypted.pdf")
    assert "has no pages" in message("zero_pages.pdf")
    assert "has no pages" in message("truncated_head.pdf")
    assert "is empty" in message("empty.pdf")
    assert "not a PDF or an image" in message("text_named.pdf")
    assert "too large to decode safely" in message("bomb.png")
    assert "too large to decode safely" in message("bomb_warning.png")
    assert "truncated" in message("truncated.png")


def test_repaired_pdfs_keep_their_text_and_say_they_were_repaired(corpus):
    for name in ("truncated_tail.pdf", "broken_xref.pdf"):
        with open_document(corpus[name].path) as document:
            assert document.page_count == len(SAMPLE_TEXTS)
            assert document.repaired
            assert any("repair" in warning for warning in document.warnings)
            assert SAMPLE_TEXTS[1] in document.page_text(1)


def test_bit_flipped_pdf_records_warnings(corpus):
    with open_document(corpus["bit_flipped.pdf"].path) as document:
        for i in range(document.page_count):
            document.render_page(i, 0.5)
        assert document.warnings


def test_huge_page_is_rendered_under_the_pixel_cap(corpus):
    with open_document(corpus["huge_page.pdf"].path) as document:
        assert document.page_size_points(0) == (HUGE_PAGE_POINTS, HUGE_PAGE_POINTS)
        image = document.render_page(0, RENDER_SCALE)
        # Square page, square image, as large as the cap allows (the scale lost < 1%).
        assert image.width == image.height
        assert image.width * image.height <= DEFAULT_MAX_PIXELS
        assert image.width > 0.99 * DEFAULT_MAX_PIXELS**0.5
        small = document.render_page(0, RENDER_SCALE, max_pixels=10_000)
        assert small.width * small.height <= 10_000
        assert small.width > 95
        # The page's big black title is still drawn at the reduced scale.
        assert np.asarray(image).min() < 64


def test_many_pages_reads_any_page(corpus):
    with open_document(corpus["many_pages.pdf"].path) as document:
        assert document.page_count == MANY_PAGES
        last = document.render_page(MANY_PAGES - 1, 1.0)
        assert last.size == (72, 72)


def test_javascript_and_attachment_do_not_stop_reading(corpus):
    with open_document(corpus["javascript_attachment.pdf"].path) as document:
        assert SAMPLE_TEXTS[0] in document.page_text(0)


def test_corpus_memory_stays_bounded_and_nothing_is_printed(corpus):
    """Open and render every case in a fresh process; measure its peak resident memory and output.

    The child loads ``fila_cli.documents.document`` without the package ``__init__`` (which imports torch,
    about 800 MB that would drown the measurement). It ends by allocating 400 MB on purpose, to prove
    the meter sees allocations. The output is checked here rather than with capfd because PyMuPDF
    prints MuPDF's messages to the sys.stdout it saw at import time, which capfd does not replace.
    """
    script = textwrap.dedent(
        """
        import json, sys, types
        from pathlib import Path
        repo = Path(sys.argv[1])
        package = types.ModuleType("fila_cli")
        package.__path__ = [str(repo / "fila_cli")]
        sys.modules["fila_cli"] = package
        from fila_cli.documents.document import open_document
        from fila_cli.errors import DocumentError

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) // 1024  # MB

        baseline = status("VmRSS")
        for path in sys.argv[2:]:
            try:
                with open_document(path) as document:
                    document.render_page(0, 2.0)
            except DocumentError:
                pass
        corpus_peak = status("VmHWM")
        ballast = bytearray(400 * 2**20)
        ballast[::4096] = b"x" * len(ballast[::4096])
        print(json.dumps({"baseline": baseline, "corpus_peak": corpus_peak, "control_peak": status("VmHWM")}))
        """
    )
    paths = [str(case.path) for case in corpus.values()]
    result = subprocess.run(
        [sys.executable, "-c", script, str(REPO), *paths], capture_output=True, text=True, timeout=120, check=True
    )
    # Only the child's own report: MuPDF's errors and warnings are kept, not printed.
    assert result.stderr == ""
    assert len(result.stdout.splitlines()) == 1, result.stdout
    memory = json.loads(result.stdout)
    assert memory["control_peak"] - memory["baseline"] >= 400, memory
    assert memory["corpus_peak"] - memory["baseline"] < MEMORY_BUDGET_MB, memory


# -- opening ---------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DocumentError, match="no such file"):
        open_document(tmp_path / "absent.pdf")
    with pytest.raises(DocumentError, match="is a directory"):
        open_document(tmp_path)


def test_kind_is_sniffed_from_content_not_name(tmp_path):
    pdf_named_bin = tmp_path / "scan.bin"
    pdf_named_bin.write_bytes(text_pdf_bytes(["hello there"]))
    with open_document(pdf_named_bin) as document:
        assert document.kind == "pdf"
        assert "hello there" in document.page_text(0)
    png_named_pdf = tmp_path / "photo.pdf"
    Image.new("RGB", (30, 20), (10, 200, 30)).save(png_named_pdf, format="PNG")
    with open_document(png_named_pdf) as document:
        assert document.kind == "image"
        assert document.page_size_points(0) == (30.0, 20.0)


def test_pdf_header_after_leading_junk_is_accepted(tmp_path):
    path = tmp_path / "junk.pdf"
    path.write_bytes(b"\x00junk from a mail gateway\n" + text_pdf_bytes(["after junk"]))
    with open_document(path) as document:
        assert document.kind == "pdf"


def test_other_image_formats_are_refused(tmp_path):
    path = tmp_path / "picture.gif"
    Image.new("RGB", (8, 8)).save(path, format="GIF")
    with pytest.raises(DocumentError, match="not a PDF or an image"):
        open_document(path)


# -- passwords -------------------------------------------------------------------------------------


def test_encrypted_with_without_and_wrong_password(corpus):
    path = corpus["encrypted.pdf"].path
    with pytest.raises(DocumentError, match="is encrypted: pass --password"):
        open_document(path)
    with pytest.raises(DocumentError, match="wrong password"):
        open_document(path, password="not-the-password")
    with open_document(path, password=PASSWORD) as document:
        assert SAMPLE_TEXTS[0] in document.page_text(0)
        assert document.render_page(0, 1.0).size == (612, 792)
    # The owner password opens it too.
    with open_document(path, password=PASSWORD + "-owner") as document:
        assert document.page_count == 1


def test_password_is_ignored_for_unencrypted_pdf(tmp_path):
    path = tmp_path / "plain.pdf"
    path.write_bytes(text_pdf_bytes(["plain"]))
    with open_document(path, password="anything") as document:
        assert document.page_count == 1


# -- rendering -------------------------------------------------------------------------------------


def _square_pdf(tmp_path: Path, rotate: int = 0) -> Path:
    # A 72 x 36 pt page; a blue square covers x 8..28, y 8..28 (PDF y grows upwards).
    path = tmp_path / f"square{rotate}.pdf"
    content = b"0 0 1 rg 8 8 20 20 re f"
    path.write_bytes(
        pdf_bytes(
            [
                b"<</Type/Catalog/Pages 2 0 R>>",
                b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
                b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 72 36]/Rotate %d/Contents 4 0 R>>" % rotate,
                b"<</Length %d>>\nstream\n" % len(content) + content + b"\nendstream",
            ]
        )
    )
    return path


def test_render_scale_is_pixels_per_point_and_content_lands_where_drawn(tmp_path):
    with open_document(_square_pdf(tmp_path)) as document:
        assert document.page_size_points(0) == (72.0, 36.0)
        image = document.render_page(0, 2.0)
        assert image.size == (144, 72)
        pixels = np.asarray(image)
        # Image rows run downwards: PDF y 8..28 at scale 2 is rows 72-56 .. 72-16 = 16..56.
        assert tuple(pixels[36, 36]) == (0, 0, 255)  # inside the square
        assert tuple(pixels[36, 100]) == (255, 255, 255)  # right of it
        assert tuple(pixels[8, 36]) == (255, 255, 255)  # above it


def test_rotated_page_reports_and_renders_its_displayed_size(tmp_path):
    with open_document(_square_pdf(tmp_path, rotate=90)) as document:
        assert document.page_size_points(0) == (36.0, 72.0)
        assert document.render_page(0, 1.0).size == (36, 72)


def test_bad_render_arguments(tmp_path):
    with open_document(_square_pdf(tmp_path)) as document:
        for scale in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(UsageError):
                document.render_page(0, scale)
        with pytest.raises(UsageError):
            document.render_page(0, 1.0, max_pixels=0)
        with pytest.raises(DocumentError, match="has 1 page; page 2 does not exist"):
            document.render_page(1, 1.0)


def test_closed_document_refuses_work(tmp_path):
    document = open_document(_square_pdf(tmp_path))
    with document:
        pass
    with pytest.raises(ValueError, match="closed"):
        document.render_page(0, 1.0)


# -- images ----------------------------------------------------------------------------------------


def _pattern(width: int = 64, height: int = 48) -> Image.Image:
    # Left half red, right half blue: orientation and colour errors both show.
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("TIFF", "tif")])
def test_images_of_each_format(tmp_path, fmt, suffix):
    path = tmp_path / f"page.{suffix}"
    _pattern().save(path, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    with open_document(path) as document:
        assert document.kind == "image"
        assert document.page_count == 1
        assert document.page_size_points(0) == (64.0, 48.0)
        assert document.page_text(0) == ""
        native = document.render_page(0, 1.0)
        assert native.mode == "RGB" and native.size == (64, 48)
        pixels = np.asarray(native).astype(int)
        assert np.abs(pixels[24, 8] - (255, 0, 0)).max() < 40
        assert np.abs(pixels[24, 56] - (0, 0, 255)).max() < 40
        assert document.render_page(0, 0.5).size == (32, 24)
        capped = document.render_page(0, 1.0, max_pixels=300)
        assert capped.width * capped.height <= 300
        assert abs(capped.width / capped.height - 64 / 48) < 0.15


def test_multi_page_tiff_has_a_page_per_frame(tmp_path):
    path = tmp_path / "fax.tif"
    first, second = _pattern(40, 30), Image.new("RGB", (20, 50), (0, 255, 0))
    first.save(path, format="TIFF", save_all=True, append_images=[second])
    with open_document(path) as document:
        assert document.page_count == 2
        assert document.page_size_points(1) == (20.0, 50.0)
        assert tuple(np.asarray(document.render_page(1, 1.0))[25, 10]) == (0, 255, 0)


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    _pattern(64, 48).save(path, format="JPEG", quality=95, exif=exif)
    with open_document(path) as document:
        assert document.page_size_points(0) == (48.0, 64.0)
        upright = np.asarray(document.render_page(0, 1.0)).astype(int)
        assert upright.shape == (64, 48, 3)
        # Clockwise: the stored left (red) half becomes the top.
        assert np.abs(upright[8, 24] - (255, 0, 0)).max() < 40
        assert np.abs(upright[56, 24] - (0, 0, 255)).max() < 40


def test_transparency_is_composited_over_white_and_16_bit_is_scaled(tmp_path):
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(clear)
    with open_document(clear) as document:
        assert tuple(np.asarray(document.render_page(0, 1.0))[5, 5]) == (255, 255, 255)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((10, 10), 32768, dtype=np.uint16)).save(deep)
    with open_document(deep) as document:
        assert tuple(np.asarray(document.render_page(0, 1.0))[5, 5]) == (128, 128, 128)


def test_large_jpeg_is_decoded_at_reduced_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (200, 200, 200)).save(path, format="JPEG")
    with open_document(path) as document:
        image = document.render_page(0, 1.0, max_pixels=120_000)
        assert image.width * image.height <= 120_000
        assert image.size == (400, 300)


# -- pages users type ------------------------------------------------------------------------------


def test_page_index_from_user():
    assert page_index_from_user(1, 3) == 0
    assert page_index_from_user(3, 3) == 2
    with pytest.raises(DocumentError, match="has 3 pages; page 5 does not exist"):
        page_index_from_user(5, 3)
    with pytest.raises(DocumentError, match="numbered from 1"):
        page_index_from_user(0, 3)
    with pytest.raises(DocumentError, match="report.pdf has 1 page; page 2"):
        page_index_from_user(2, 1, name="report.pdf")


def test_document_index_from_user_names_the_file(tmp_path):
    path = make_good_pdf(tmp_path / "three.pdf", ["one", "two", "three"])
    with open_document(path) as document:
        assert document.index_from_user(2) == 1
        with pytest.raises(DocumentError, match=r"three\.pdf has 3 pages; page 5 does not exist"):
            document.index_from_user(5)


@pytest.mark.parametrize(
    "spec, expected",
    [("1,3-5", [0, 2, 3, 4]), ("3-5", [2, 3, 4]), (" 2 , 1 ", [0, 1]), ("1-3,2,3", [0, 1, 2]), ("6", [5]), ("4-4", [3])],
)
def test_parse_page_spec(spec, expected):
    assert parse_page_spec(spec, 6) == expected


@pytest.mark.parametrize("spec", ["", " ", "a", "1,,2", "1,", "5-3", "-2", "1-", "1.5", "1;2", "1--2", "two"])
def test_parse_page_spec_malformed_is_usage_error(spec):
    with pytest.raises(UsageError):
        parse_page_spec(spec, 6)


@pytest.mark.parametrize("spec", ["0", "0-2"])
def test_page_zero_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="numbered from 1"):  # issue 24: caught before the model loads
        parse_page_spec(spec, 6)


@pytest.mark.parametrize("spec", ["7", "2-9", "1,7"])
def test_parse_page_spec_out_of_range_is_document_error(spec):
    with pytest.raises(DocumentError):
        parse_page_spec(spec, 6)


def test_parse_page_spec_huge_range_fails_fast():
    start = time.perf_counter()
    with pytest.raises(DocumentError, match="has 6 pages; page 999999999 does not exist"):
        parse_page_spec("1-999999999", 6)
    assert time.perf_counter() - start < 0.1


# -- hashes ----------------------------------------------------------------------------------------


def test_content_hash_is_sha256_of_the_bytes_and_stable(tmp_path):
    path = make_good_pdf(tmp_path / "a.pdf", ["alpha", "beta"])
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == expected
    with open_document(path) as document:
        assert document.content_hash() == expected
        assert document.content_hash() == expected
    renamed = path.rename(tmp_path / "renamed.bin")
    assert file_sha256(renamed) == expected
    data = bytearray(renamed.read_bytes())
    data[-10] ^= 1
    renamed.write_bytes(bytes(data))
    assert file_sha256(renamed) != expected


def test_file_sha256_missing_file_is_document_error(tmp_path):
    with pytest.raises(DocumentError):
        file_sha256(tmp_path / "absent.pdf")


# -- the good PDF helper others use ----------------------------------------------------------------


def test_make_good_pdf_has_text_layers_and_one_scanned_page(tmp_path):
    texts = ["Invoice total due 42 EUR", "Delivery to 12 Harbour Road", "Reference number QX-7731"]
    path = make_good_pdf(tmp_path / "mixed.pdf", texts, scanned_page=2)
    with open_document(path) as document:
        assert document.page_count == 3
        assert texts[0] in document.page_text(0)
        assert texts[1] in document.page_text(1)
        assert document.page_text(2).strip() == ""
        # The scanned page carries its text as pixels: dark ink where the text line is.
        scan = np.asarray(document.render_page(2, 1.0).convert("L"))
        assert scan[60:100, 60:300].min() < 100
        assert scan[400:, :].min() > 200
    # PyMuPDF itself finds no text on the scanned page either.
    check = pymupdf.open(path)
    assert check[2].get_text().strip() == ""
    check.close()
