"""Documents in, page images and page text out.

A :class:`Document` is a PDF (read with PyMuPDF) or a raster image (PNG, JPEG, WebP, TIFF, read
with Pillow). The kind is decided by the file's first bytes, never by its name, so a text file
called ``report.pdf`` is refused and a PDF called ``scan.bin`` is read.

Every failure a user can cause (missing file, not a document, corrupt, encrypted, no such page,
an image that would decode to gigapixels) is a :class:`~fila_cli.errors.DocumentError` with a
one-line message naming the file and what to do. MuPDF's own stderr chatter is switched off; the
warnings it collects (for instance "repairing PDF document") are kept on ``Document.warnings``
for the caller to show.

Memory is bounded by one page: pages are rendered one at a time, and every render is capped at
``max_pixels`` (the scale is lowered until the page fits), so a 200x200-inch page or a PDF with
a gigapixel image costs no more than an ordinary page. Pages are 0-based in this API;
:func:`page_index_from_user` and :func:`parse_page_spec` convert the 1-based numbers users type.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np
import pymupdf
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from fila_cli.errors import DocumentError, UsageError

# PyMuPDF prints MuPDF's errors (and optionally warnings) on stdout, where they would corrupt the
# CLI's output; we report problems as our own errors and keep MuPDF's messages on Document.warnings.
pymupdf.TOOLS.mupdf_display_errors(False)
pymupdf.TOOLS.mupdf_display_warnings(False)

DocumentKind = Literal["pdf", "image"]

# Largest render, in pixels (width * height). 16.7 MP is an A4 page at ~400 dpi or a Letter page at
# 4096 px on its long side: far more than the largest anyres canvas (1008 px) needs, and 50 MB as RGB.
DEFAULT_MAX_PIXELS = 4096 * 4096
# Raster formats we read. An image whose header claims more pixels than Pillow's decompression-bomb
# limit (Image.MAX_IMAGE_PIXELS, 89.5 MP by default, read at call time) is refused before decoding.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "TIFF")
# Formats whose extra frames are pages (a multi-page TIFF is a scanned document). An animated
# PNG or WebP is one picture: only its first frame is read.
MULTI_PAGE_FORMATS: frozenset[str] = frozenset({"TIFF"})
# The PDF header may follow up to 1 KiB of junk (readers accept it, so do we).
PDF_MAGIC = b"%PDF-"
SNIFF_BYTES = 1024
# Streamed hashing block.
HASH_CHUNK_BYTES = 1 << 20
# Lowering the scale until a render fits max_pixels: step factor, and how many tries at most.
SCALE_SHRINK_STEP = 0.995
MAX_SCALE_SHRINKS = 64
# EXIF orientation of an image stored upright.
EXIF_UPRIGHT = 1
# EXIF orientations that swap width and height (rotations by 90 or 270 degrees, with or without a mirror).
EXIF_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# The page's background, behind transparent pixels.
WHITE = (255, 255, 255)
# 16-bit sample range, mapped to 8 bits.
UINT16_MAX = 65535


@dataclass(frozen=True)
class _ImagePage:
    """One page of an image document: the frame index and its displayed size (after EXIF rotation)."""

    frame: int
    width: int
    height: int
    orientation: int  # EXIF orientation, 1 (upright) to 8


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (a multi-GB scan never sits in memory)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
                digest.update(block)
    except OSError as error:
        raise DocumentError(f"{path}: cannot read it ({error.strerror or error}); check the path and its permissions") from error
    return digest.hexdigest()


def page_index_from_user(n: int, page_count: int, *, name: str | Path | None = None) -> int:
    """Convert a 1-based page number a user typed into a 0-based index, or raise DocumentError."""
    where = f"{name}" if name is not None else "the document"
    if n < 1:
        raise DocumentError(f"{where}: page {n} does not exist; pages are numbered from 1")
    if n > page_count:
        raise DocumentError(f"{where} has {_pages(page_count)}; page {n} does not exist")
    return n - 1


_PAGE_SPEC_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def page_ranges(spec: str) -> list[tuple[int, int]]:
    """The 1-based inclusive (first, last) ranges of a page selection such as ``"1,3-5"``.

    Syntax only (no document needed), so a typo fails before anything slow: malformed text
    (``"1,,2"``, ``"a"``, ``"5-3"``, ``"-2"``) and page 0 are a UsageError.
    """
    ranges = []
    for item in spec.split(","):
        match = _PAGE_SPEC_ITEM.match(item)
        if match is None:
            raise UsageError(f"bad page selection {spec!r}: use page numbers and ranges such as 1,3-5")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if first < 1:
            raise UsageError(f"bad page selection {spec!r}: pages are numbered from 1")
        if last < first:
            raise UsageError(f"bad page selection {spec!r}: range {first}-{last} runs backwards; write {last}-{first}")
        ranges.append((first, last))
    return ranges


def parse_page_spec(spec: str, page_count: int, *, name: str | Path | None = None) -> list[int]:
    """Parse a page selection such as ``"1,3-5"`` (1-based, inclusive) into sorted unique 0-based indices.

    Malformed text is a UsageError (see :func:`page_ranges`); a page that the document does not
    have (0, or past the end) is a DocumentError.
    """
    pages: set[int] = set()
    for first, last in page_ranges(spec):
        # Check the ends before expanding, so "1-999999999" fails fast instead of building a huge set.
        page_index_from_user(first, page_count, name=name)
        page_index_from_user(last, page_count, name=name)
        pages.update(range(first - 1, last))
    return sorted(pages)


def open_document(path: str | Path, password: str | None = None) -> Document:
    """Open a PDF or image for reading; every user-caused failure is a DocumentError.

    ``password`` opens an encrypted PDF (either its user or owner password); it is ignored for
    documents that are not encrypted.
    """
    path = Path(path)
    head = _read_head(path)
    if PDF_MAGIC in head:
        return _open_pdf(path, password)
    return _open_image(path)


class Document:
    """An open document: page count, page sizes, text layers and page renders.

    Build it with :func:`open_document`. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        kind: DocumentKind,
        *,
        pdf: pymupdf.Document | None = None,
        image_pages: list[_ImagePage] | None = None,
        warnings: list[str] | None = None,
    ):
        self.path = path
        self.kind: DocumentKind = kind
        self._pdf = pdf
        self._image_pages = image_pages or []
        # MuPDF's warnings (e.g. a repaired cross-reference table), in order, without repeats.
        self.warnings: list[str] = list(warnings or [])
        # The same, per page: what it said while loading, rendering or reading each page (0-based).
        self._page_warnings: dict[int, list[str]] = {}
        self._closed = False

    # -- facts -------------------------------------------------------------------------------

    @property
    def page_count(self) -> int:
        if self._pdf is not None:
            return self._pdf.page_count
        return len(self._image_pages)

    @property
    def repaired(self) -> bool:
        """True when MuPDF had to rebuild the PDF's structure to open it (a damaged file)."""
        return bool(self._pdf is not None and self._pdf.is_repaired)

    def page_size_points(self, i: int) -> tuple[float, float]:
        """(width, height) of page ``i`` in points as displayed (rotation applied); pixels for an image."""
        self._check_index(i)
        if self._pdf is not None:
            rect = self._load_pdf_page(i).rect
            return (float(rect.width), float(rect.height))
        page = self._image_pages[i]
        return (float(page.width), float(page.height))

    def page_text(self, i: int) -> str:
        """The text layer of page ``i`` in reading order; "" for images and scanned pages."""
        self._check_index(i)
        if self._pdf is None:
            return ""
        page = self._load_pdf_page(i)
        try:
            text = page.get_text("text", sort=True)
        except (RuntimeError, ValueError) as error:
            raise DocumentError(f"{self.path}: cannot read the text of page {i + 1} ({error}); the file may be damaged") from error
        finally:
            self._collect_warnings(i)
        return text

    def page_warnings(self, i: int) -> list[str]:
        """MuPDF's warnings while loading, rendering or reading page ``i`` (0-based) so far, in order,
        without repeats (a complaint heard on an earlier page too is listed again here)."""
        return list(self._page_warnings.get(i, []))

    def content_hash(self) -> str:
        """Hex sha256 of the file's bytes (a cache key that survives renames)."""
        return file_sha256(self.path)

    # -- rendering ---------------------------------------------------------------------------

    def render_page(self, i: int, scale: float, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Render page ``i`` as an RGB image at ``scale`` pixels per point (per pixel for images).

        The scale is lowered, keeping the aspect ratio, until width * height <= ``max_pixels``.
        """
        self._check_index(i)
        if not (math.isfinite(scale) and scale > 0):
            raise UsageError(f"render scale must be a positive number, got {scale}")
        if max_pixels < 1:
            raise UsageError(f"the pixel cap must be at least 1, got {max_pixels}")
        if self._pdf is not None:
            return self._render_pdf_page(i, scale, max_pixels)
        return self._render_image_page(i, scale, max_pixels)

    def render_scale(self, i: int, scale: float, max_pixels: int = DEFAULT_MAX_PIXELS) -> float:
        """The scale ``render_page(i, scale, max_pixels)`` really renders at (lowered to fit ``max_pixels``)."""
        self._check_index(i)
        if self._pdf is not None:
            rect = self._load_pdf_page(i).rect
            return _fit_scale(scale, max_pixels, lambda s: _pdf_render_size(rect, s))
        page = self._image_pages[i]
        return _fit_scale(scale, max_pixels, lambda s: _image_render_size(page.width, page.height, s))

    def render_size(self, i: int, scale: float) -> tuple[int, int]:
        """(width, height) in pixels of page ``i`` rendered at ``scale`` (no pixel cap applied)."""
        self._check_index(i)
        if self._pdf is not None:
            return _pdf_render_size(self._load_pdf_page(i).rect, scale)
        page = self._image_pages[i]
        return _image_render_size(page.width, page.height, scale)

    def pdf_page(self, i: int) -> pymupdf.Page | None:
        """Page ``i`` of a PDF as PyMuPDF's page (for its text and geometry); None for an image."""
        self._check_index(i)
        return self._load_pdf_page(i) if self._pdf is not None else None

    def _render_pdf_page(self, i: int, scale: float, max_pixels: int) -> Image.Image:
        page = self._load_pdf_page(i)
        rect = page.rect
        if rect.is_empty or rect.is_infinite:
            raise DocumentError(f"{self.path}: page {i + 1} has no area ({rect.width:g}x{rect.height:g} points); the file is damaged")
        scale = _fit_scale(scale, max_pixels, lambda s: _pdf_render_size(rect, s))
        try:
            pixmap = page.get_pixmap(matrix=pymupdf.Matrix(scale, scale), colorspace=pymupdf.csRGB, alpha=False)
        except (RuntimeError, ValueError, MemoryError) as error:
            raise DocumentError(f"{self.path}: cannot render page {i + 1} ({error}); the file may be damaged") from error
        finally:
            self._collect_warnings(i)
        return Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)

    def _render_image_page(self, i: int, scale: float, max_pixels: int) -> Image.Image:
        page = self._image_pages[i]
        scale = _fit_scale(scale, max_pixels, lambda s: _image_render_size(page.width, page.height, s))
        target = _image_render_size(page.width, page.height, scale)
        transposed = page.orientation in EXIF_TRANSPOSING_ORIENTATIONS
        try:
            with _open_pillow(self.path) as image:
                image.seek(page.frame)
                # JPEG only: decode at a reduced DCT scale when the target is much smaller, so a huge
                # JPEG never decodes at full size. draft() takes the stored (pre-rotation) size.
                image.draft("RGB", (target[1], target[0]) if transposed else target)
                image.load()
                upright = ImageOps.exif_transpose(image) if page.orientation != EXIF_UPRIGHT else image
                rgb = _to_rgb(upright)
                if rgb is image:
                    rgb = image.copy()  # the file's image is closed on leaving the block
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise DocumentError(f"{self.path}: cannot decode the image ({_reason(error)}); the file may be truncated or damaged") from error
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        return rgb

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._pdf is not None and not self._closed:
            self._pdf.close()
        self._closed = True

    def __enter__(self) -> Document:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Document({str(self.path)!r}, kind={self.kind!r}, page_count={self.page_count})"

    # -- helpers -----------------------------------------------------------------------------

    def index_from_user(self, n: int) -> int:
        """:func:`page_index_from_user` for this document (the message names the file)."""
        return page_index_from_user(n, self.page_count, name=self.path)

    def _check_index(self, i: int) -> None:
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        if not 0 <= i < self.page_count:
            raise DocumentError(f"{self.path} has {_pages(self.page_count)}; page {i + 1} does not exist")

    def _load_pdf_page(self, i: int) -> pymupdf.Page:
        assert self._pdf is not None
        try:
            return self._pdf.load_page(i)
        except (RuntimeError, ValueError, IndexError) as error:
            raise DocumentError(f"{self.path}: cannot load page {i + 1} ({error}); the file is damaged") from error
        finally:
            self._collect_warnings(i)

    def _collect_warnings(self, page: int | None = None) -> None:
        """Take MuPDF's pending warnings into ``warnings`` (and page ``page``'s, when one was being read)."""
        for line in pymupdf.TOOLS.mupdf_warnings(reset=True).splitlines():
            if not line:
                continue
            if line not in self.warnings:
                self.warnings.append(line)
            if page is not None and line not in self._page_warnings.setdefault(page, []):
                self._page_warnings[page].append(line)


# -- opening -----------------------------------------------------------------------------------


def _read_head(path: Path) -> bytes:
    if not path.exists():
        raise DocumentError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise DocumentError(f"{path} is a directory; give a PDF or image file")
    try:
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as error:
        raise DocumentError(f"{path}: cannot read it ({error.strerror or error}); check its permissions") from error
    if not head:
        raise DocumentError(f"{path} is empty (0 bytes); give a PDF or image file")
    return head


def _utf8_name(path: Path) -> bool:
    """False for a name whose bytes are not UTF-8 (a Latin-1 name from an old zip, held by Python
    as lone surrogates): MuPDF takes names as UTF-8 and fails to open it, so fila reads its bytes."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _open_pdf(path: Path, password: str | None) -> Document:
    pymupdf.TOOLS.reset_mupdf_warnings()
    try:
        pdf = pymupdf.open(path, filetype="pdf") if _utf8_name(path) else pymupdf.open(stream=path.read_bytes(), filetype="pdf")
    except Exception as error:  # PyMuPDF raises FileDataError, RuntimeError, ValueError... for bad files
        # MuPDF's first complaint says more than PyMuPDF's "Failed to open file ...".
        complaints = pymupdf.TOOLS.mupdf_warnings(reset=True).splitlines()
        why = complaints[0] if complaints else _reason(error)
        raise DocumentError(f"{path} is not a readable PDF ({why}); the file is corrupt or truncated") from error
    document = Document(path, "pdf", pdf=pdf)
    document._collect_warnings()
    try:
        _unlock(pdf, path, password)
        count = pdf.page_count
        if count < 1:
            why = "the file is damaged" if pdf.is_repaired else "there is nothing to read"
            raise DocumentError(f"{path} has no pages; {why}")
    except BaseException:
        document.close()
        raise
    return document


def _unlock(pdf: pymupdf.Document, path: Path, password: str | None) -> None:
    if not pdf.needs_pass:
        return
    if password is None:
        raise DocumentError(f"{path} is encrypted: pass --password")
    if not pdf.authenticate(password):
        raise DocumentError(f"{path}: wrong password; check --password")


def _open_image(path: Path) -> Document:
    try:
        with _open_pillow(path) as image:
            pages = _image_pages(image, path)
    except UnidentifiedImageError as error:
        raise DocumentError(f"{path} is not a PDF or an image ({', '.join(IMAGE_FORMATS)}); give a document file") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DocumentError(f"{path}: {_bomb_message(error)}") from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise DocumentError(f"{path}: cannot read the image ({_reason(error)}); the file may be truncated or damaged") from error
    return Document(path, "image", image_pages=pages)


class _PillowImage:
    """``Image.open`` restricted to our formats, with decompression-bomb warnings raised as errors."""

    def __init__(self, path: Path):
        self._path = path
        self._catcher = warnings.catch_warnings()
        self._image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        self._catcher.__enter__()
        # Pillow only warns between 1x and 2x its limit; a warning would let a bomb through.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # Pillow's other warnings (odd EXIF, palette transparency) are nothing a user can act on.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        try:
            self._image = Image.open(self._path, formats=IMAGE_FORMATS)
        except BaseException:
            self._catcher.__exit__(None, None, None)
            raise
        return self._image

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._image is not None:
                self._image.close()
        finally:
            self._catcher.__exit__(None, None, None)


def _open_pillow(path: Path) -> _PillowImage:
    return _PillowImage(path)


def _image_pages(image: Image.Image, path: Path) -> list[_ImagePage]:
    frames = getattr(image, "n_frames", 1) if image.format in MULTI_PAGE_FORMATS else 1
    pages = []
    for frame in range(frames):
        image.seek(frame)
        width, height = image.size
        # Pillow checks the first frame on open; check every page (a TIFF's later pages too).
        _check_pixel_count(width, height)
        if width < 1 or height < 1:
            raise DocumentError(f"{path}: page {frame + 1} has no pixels ({width}x{height})")
        orientation = _exif_orientation(image)
        if orientation in EXIF_TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        pages.append(_ImagePage(frame, width, height, orientation))
    return pages


def _exif_orientation(image: Image.Image) -> int:
    # A PNG's eXIf chunk may follow the pixels, and Pillow decodes the whole image to find it. Only an
    # eXIf before the pixels counts here, which keeps opening cheap and page size and render in agreement.
    if image.format == "PNG" and "exif" not in image.info:
        return EXIF_UPRIGHT
    orientation = image.getexif().get(ExifTags.Base.Orientation, EXIF_UPRIGHT)
    return orientation if isinstance(orientation, int) else EXIF_UPRIGHT


def _check_pixel_count(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise Image.DecompressionBombError(
            f"Image size ({width * height} pixels) exceeds limit of {limit} pixels, could be decompression bomb DOS attack."
        )


def _bomb_message(error: BaseException) -> str:
    limit = Image.MAX_IMAGE_PIXELS or 0
    return (
        f"the image is too large to decode safely ({_reason(error)}; Pillow's limit is {limit / 1e6:.0f} megapixels); "
        "downscale it or convert it to a PDF"
    )


# -- sizes and pixels ----------------------------------------------------------------------------


def _pdf_render_size(rect: pymupdf.Rect, scale: float) -> tuple[int, int]:
    # The same rounding MuPDF applies to the pixmap: the integer bounding box of the scaled page.
    box = (rect * pymupdf.Matrix(scale, scale)).irect
    return (box.width, box.height)


def _image_render_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def _fit_scale(scale: float, max_pixels: int, size_at: Callable[[float], tuple[int, int]]) -> float:
    """The largest scale <= ``scale`` whose render (``size_at(scale)``) has at most ``max_pixels`` pixels."""
    width, height = size_at(scale)
    if width * height <= max_pixels:
        return scale
    # Area grows with scale squared; then step down to absorb the pixel rounding of the edges.
    scale *= math.sqrt(max_pixels / (width * height))
    for _ in range(MAX_SCALE_SHRINKS):
        width, height = size_at(scale)
        if width * height <= max_pixels:
            return scale
        scale *= SCALE_SHRINK_STEP
    return scale


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: transparency over white, 16-bit and float samples scaled to 8 bits."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        samples = np.asarray(image, dtype=np.float32) * (255.0 / UINT16_MAX)
        return Image.fromarray(samples.round().astype(np.uint8), "L").convert("RGB")
    if image.mode in ("I", "F"):
        # 32-bit samples carry no fixed range: stretch the page's own range to 0..255.
        samples = np.asarray(image, dtype=np.float64)
        low, high = float(samples.min()), float(samples.max())
        span = high - low or 1.0
        return Image.fromarray(((samples - low) * (255.0 / span)).round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


# -- messages ------------------------------------------------------------------------------------


def _pages(n: int) -> str:
    return f"{n} page" if n == 1 else f"{n} pages"


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
