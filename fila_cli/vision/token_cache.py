"""On-disk cache of visual tokens: a second question on a page skips rendering and encoding.

An entry is keyed by everything the tokens depend on: the document's content hash, the page,
the render settings (canvases, crop size, normalisation, pixel cap, and with fusion on the
high-resolution scale, which sets the render zoom and the ConvNeXt's canvas), the identities of the
vision and fusion weights, and the precision and device kind the encoder ran at. Entries are
safetensors files (tokens; the canvas geometry and the page's read notices as JSON in the metadata)
in the ``tokens`` store of fila's cache folder (``caches/folder.py``), written atomically and
verified (a checksum over all they hold) before use. The notices (MuPDF repaired the file, or
complained while rendering the page) make a second question answered from the cache warn exactly
as the first one did.

The entries count against fila's one cache cap (``caches.budget.CacheBudget``, shared with the LLM
prefix states): a hit marks the entry used, a write evicts the least recently used entries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from fila_cli.caches.entries import StoreInfo
from fila_cli.caches.folder import CacheFolder
from fila_cli.config import AnyresConfig
from fila_cli.documents.canvas import CanvasGeometry
from fila_cli.documents.notices import ReadNotices

if TYPE_CHECKING:  # the model code (torch) loads only when tokens are read or written
    from fila_cli.vision.model.encoder import EncodedPage

# Bump when the rendering or encoding changes in a way the key does not capture.
# 2: entries carry the page's read notices (1's did not: a damaged page would be served silently).
# 3: bfloat16 on the CPU attends through oneDNN Graph (other roundings than 2's SDPA tokens).
# 4: entries carry a checksum over all they hold, and live in the cache folder's tokens/ store.
CACHE_FORMAT_VERSION = 4
_TOKENS = "visual_tokens"
_FORMAT = "format"


def token_cache_key(document_sha256: str, page_index: int, anyres: AnyresConfig, max_pixels: int,
                    vision_identity: str, fusion_identity: str | None, *, dtype: str, device: str,
                    highres_scale: Fraction | None = None) -> str:
    """The cache key of a page's tokens: everything they depend on.

    ``dtype`` ("float32", "bfloat16", ...) and ``device`` (the device *kind*: "cpu", "cuda", "mps";
    kernels differ between them) are the precision the encoder ran at. ``highres_scale``
    (fusion on) sets the render zoom and the ConvNeXt's canvas.
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
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass
class CachedPage:
    page: EncodedPage
    notices: ReadNotices  # what MuPDF said when the page was rendered


class TokenCache:
    """Visual tokens on disk, in the ``tokens`` store of fila's cache folder (default: the user's,
    under its default cap). A ``KeyedCache[CachedPage]``: verified on read, a failed write warns once."""

    def __init__(self, folder: CacheFolder | None = None):
        self.folder = folder or CacheFolder()
        self.store = self.folder.tokens

    @property
    def directory(self) -> Path:
        return self.store.directory

    def get(self, key: str) -> CachedPage | None:
        import torch

        from fila_cli.vision.model.encoder import EncodedPage

        entry = self.store.read(key)
        if entry is None:
            return None
        try:
            if entry.metadata.get(_FORMAT) != str(CACHE_FORMAT_VERSION):
                raise ValueError("another format")
            geometry = CanvasGeometry(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in json.loads(entry.metadata["geometry"]).items()})
            notices = ReadNotices.from_json(json.loads(entry.metadata["notices"]))
            tokens = torch.from_numpy(entry.arrays[_TOKENS])
        except (KeyError, TypeError, ValueError):
            self.store.discard(key)  # whole and checked, but not what this fila writes: recomputed
            return None
        return CachedPage(EncodedPage(tokens=tokens, geometry=geometry), notices)

    def put(self, key: str, value: CachedPage) -> None:
        """Store the page's tokens and what MuPDF said rendering it; then evict over the cap."""
        geometry = {k: getattr(value.page.geometry, k) for k in CanvasGeometry.__dataclass_fields__}
        metadata = {_FORMAT: str(CACHE_FORMAT_VERSION), "geometry": json.dumps(geometry),
                    "notices": json.dumps(value.notices.to_json())}
        self.store.write(key, {_TOKENS: value.page.tokens.contiguous().numpy()}, metadata)

    def discard(self, key: str) -> None:
        self.store.discard(key)

    def info(self) -> StoreInfo:
        return self.store.info()

    def clear(self) -> int:
        return self.store.clear()
