"""fila: answer questions about documents with a local FILA vision-language model.

The CLI is a thin layer over this package; the main entry points are importable directly::

    from fila_cli import load_encoder, preprocess, AnyresConfig, FusionConfig
"""

from __future__ import annotations

__version__ = "0.1.0"

from .anyres import AnyresImage, CanvasGeometry, preprocess
from .config import AnyresConfig, ConvNeXtConfig, FusionConfig
from .errors import DocumentError, ExitCode, FilaError, ModelError, UsageError

__all__ = [
    "AnyresConfig",
    "AnyresImage",
    "CanvasGeometry",
    "ConvNeXtConfig",
    "DocumentError",
    "ExitCode",
    "FilaError",
    "FusionConfig",
    "ModelError",
    "UsageError",
    "__version__",
    "load_encoder",
    "load_vision_weights",
    "preprocess",
]


def __getattr__(name: str):
    # Model loading pulls in transformers and timm: import it only when asked for.
    if name in ("load_encoder", "load_vision_weights", "build_encoder"):
        from . import vision

        return getattr(vision, name)
    raise AttributeError(name)
