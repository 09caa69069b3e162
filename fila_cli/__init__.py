"""fila: answer questions about documents with a local FILA vision-language model.

The package follows the path a page takes; each layer imports only the layers above it here::

    documents/   PDF or image -> chosen pages -> page image at its canvas's zoom
    vision/      page image -> anyres crops + high-res view -> Hybrid Encoder -> visual tokens
    llm/         visual tokens + prompt -> llama.cpp -> answer and log-probabilities
    bundles/     which weight files make a model; downloads
    qa/          ask, batch: documents + vision + llm put together (train/, eval/ beside it)
    cli/         the ``fila`` command: options in, output out

``config``, ``errors``, ``gguf_files`` and ``disk_cache`` (one size cap over the caches) sit below them all. The CLI is a thin layer over this
API, importable directly::

    from fila_cli import Asker, AskOptions, ChatSession, ModelOptions, resolve_bundle, load_encoder, preprocess
    from fila_cli import TrainConfig, export_checkpoint            # fila train (the loop: fila_cli.train.loop.train)

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
    "AnyresImage": "vision.anyres",
    "CanvasGeometry": "documents.canvas",
    "preprocess": "vision.anyres",
    "DocumentError": "errors",
    "ExitCode": "errors",
    "FilaError": "errors",
    "ModelError": "errors",
    "UsageError": "errors",
    "build_encoder": "vision.load",
    "load_encoder": "vision.load",
    "load_vision_weights": "vision.load",
    "HybridEncoder": "vision.model.encoder",
    "Answer": "qa.ask",
    "Asker": "qa.ask",
    "ChatSession": "qa.chat",
    "PrefixStore": "llm.prefix_store",
    "write_sample_invoice": "documents.sample",
    "AskOptions": "qa.options",
    "ModelOptions": "qa.options",
    "Bundle": "bundles.bundle",
    "resolve_bundle": "bundles.bundle",
    "open_document": "documents.document",
    "locate_answer": "documents.evidence",
    "Evidence": "documents.evidence",
    "EvidenceBox": "documents.evidence",
    "crop_boundary_notice": "documents.evidence",
    "LlamaBackend": "llm.backend",
    "SamplingParams": "llm.sampling",
    "anls": "eval.anls",
    "vqa_accuracy": "eval.vqa_accuracy",
    "relaxed_accuracy": "eval.relaxed_accuracy",
    "task_spec": "eval.tasks",
    "data_files": "eval.datasets",
    "read_examples": "eval.datasets",
    "run_eval": "eval.run",
    "score_predictions": "eval.scores",
    "read_predictions": "eval.scores",
    "make_fragmentation": "eval.fragmentation",
    "TrainConfig": "train.config",
    "export_checkpoint": "train.loop",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fila_cli' has no attribute {name!r}")
