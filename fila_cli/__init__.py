"""fila: answer questions about documents with a local FILA vision-language model.

The CLI is a thin layer over this package; the main entry points are importable directly::

    from fila_cli import Asker, AskOptions, resolve_bundle, load_encoder, preprocess

Imports are lazy: ``import fila_cli`` does not load torch, so ``fila --help`` and
``fila weights`` start fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AnyresConfig": "config",
    "ConvNeXtConfig": "config",
    "FusionConfig": "config",
    "AnyresImage": "anyres",
    "CanvasGeometry": "anyres",
    "preprocess": "anyres",
    "DocumentError": "errors",
    "ExitCode": "errors",
    "FilaError": "errors",
    "ModelError": "errors",
    "UsageError": "errors",
    "build_encoder": "vision",
    "load_encoder": "vision",
    "load_vision_weights": "vision",
    "HybridEncoder": "model.encoder",
    "Answer": "ask",
    "Asker": "ask",
    "AskOptions": "ask",
    "Bundle": "bundles",
    "resolve_bundle": "bundles",
    "open_document": "documents",
    "LlamaBackend": "llm",
    "SamplingParams": "llm",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fila_cli' has no attribute {name!r}")
