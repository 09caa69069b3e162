"""On-disk cache of visual tokens: a second question on a page skips rendering and encoding.

An entry is keyed by everything the tokens depend on: the document's content hash, the page,
the render settings (canvases, crop size, normalisation, pixel cap, and with fusion on the
high-resolution scale, which sets the render zoom and the ConvNeXt's canvas), the identities of the
vision and fusion weights, and the precision and device kind the encoder ran at. Entries are
safetensors files (tokens; the canvas geometry and the page's read notices as JSON in the metadata),
written atomically. The notices (MuPDF repaired the file, or complained while rendering the page)
make a second question answered from the cache warn exactly as the first one did.

The entries count against fila's one cache cap (``disk_cache.CacheBudget``, shared with the LLM
prefix states): a hit marks the entry used, a write evicts the least recently used entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from fila_cli.config import AnyresConfig
from fila_cli.disk_cache import CacheBudget, touch
from fila_cli.documents.canvas import CanvasGeometry
from fila_cli.documents.notices import ReadNotices

if TYPE_CHECKING:  # the model code (torch) loads only when tokens are read or written
    from fila_cli.vision.model.encoder import EncodedPage

CACHE_DIR_ENV = "FILA_CACHE_DIR"
# Bump when the rendering or encoding changes in a way the key does not capture.
# 2: entries carry the page's read notices (1's did not: a damaged page would be served silently).
# 3: bfloat16 on the CPU attends through oneDNN Graph (other roundings than 2's SDPA tokens).
CACHE_FORMAT_VERSION = 3
_TOKENS = "visual_tokens"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fila" / "tokens"


def token_cache_key(document_sha256: str, page_index: int, anyres: AnyresConfig, max_pixels: int,
                    vision_identity: str, fusion_identity: str | None, *, dtype: str, device: str,
                    highres_scale: Fraction | None = None, **settings: object) -> str:
    """The cache key of a page's tokens: everything they depend on.

    ``dtype`` ("float32", "bfloat16", ...) and ``device`` (the device *kind*: "cpu", "cuda", "mps";
    kernels differ between them) are the precision the encoder ran at. ``highres_scale``
    (fusion on) sets the render zoom and the ConvNeXt's canvas. Further ``settings`` (JSON
    values, e.g. a render setting of a new branch) join the key under their own names.
    """
    key = {
        "version": CACHE_FORMAT_VERSION,
        "document": document_sha256,
        "page": page_index,
        "crop_size": anyres.crop_size,
        "canvases": anyres.image_grid_pinpoints,
        "mean": anyres.image_mean,
        "std": anyres.image_std,
        "max_pixels": max_pixels,
        "vision": vision_identity,
        "fusion": fusion_identity,
        "dtype": dtype,
        "device": device,
        # Fusion on: the page is rendered at this multiple of the ViT canvas's zoom and the ConvNeXt
        # reads it on the canvas x this (the zoom and the high-resolution size follow from it).
        "highres_scale": None if highres_scale is None else [highres_scale.numerator, highres_scale.denominator],
    }
    clashes = sorted(set(settings) & set(key))
    if clashes:
        raise ValueError(f"cache key settings {clashes} are already part of the key")
    return hashlib.sha256(json.dumps({**key, **settings}, sort_keys=True).encode()).hexdigest()


@dataclass
class CacheInfo:
    path: Path
    entries: int
    bytes: int


@dataclass
class CachedPage:
    page: EncodedPage
    notices: ReadNotices  # what MuPDF said when the page was rendered


class TokenCache:
    """Visual tokens on disk. ``budget``: the size cap they share with the prefix states (none: uncapped)."""

    def __init__(self, directory: Path | None = None, budget: CacheBudget | None = None):
        self.directory = directory or default_cache_dir()
        self.budget = budget

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> CachedPage | None:
        from fila_cli.vision.model.encoder import EncodedPage

        path = self._path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                tokens = handle.get_tensor(_TOKENS)
                metadata = handle.metadata()
                geometry = CanvasGeometry(**{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in json.loads(metadata["geometry"]).items()})
                notices = ReadNotices.from_json(json.loads(metadata["notices"]))
            touch(path)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError):
            path.unlink(missing_ok=True)  # a damaged entry is simply recomputed
            return None
        return CachedPage(EncodedPage(tokens=tokens, geometry=geometry), notices)

    def put(self, key: str, page: EncodedPage, notices: ReadNotices | None = None) -> None:
        """Store the page's tokens and what MuPDF said rendering it; then evict over the budget."""
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        geometry = {k: getattr(page.geometry, k) for k in CanvasGeometry.__dataclass_fields__}
        metadata = {"geometry": json.dumps(geometry), "notices": json.dumps((notices or ReadNotices()).to_json())}
        save_file({_TOKENS: page.tokens.contiguous()}, str(partial), metadata=metadata)
        partial.replace(path)
        touch(path)
        if self.budget is not None:
            self.budget.evict(keep=path)

    def _files(self) -> list[Path]:
        # The prefix states live in a sub-folder but are not safetensors files: not counted here.
        return list(self.directory.rglob("*.safetensors")) if self.directory.exists() else []

    def info(self) -> CacheInfo:
        files = self._files()
        return CacheInfo(self.directory, len(files), sum(f.stat().st_size for f in files))

    def clear(self) -> int:
        files = list(self.directory.rglob("*.safetensors*")) if self.directory.exists() else []
        for file in files:
            file.unlink(missing_ok=True)
        return len(files)
