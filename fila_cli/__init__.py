"""fila: answer questions about documents with a local FILA vision-language model.

    import fila_cli

    with fila_cli.load() as model:  # the default model; or a bundle's name or folder
        answer = model.ask("report.pdf", "What is the total due?", pages=[1, 3])
        print(answer.answer, answer.pages, answer.confidence)

The package follows the path a page takes; each layer imports only the layers above it here::

    documents/   PDF or image -> chosen pages -> page image at its canvas's zoom
    vision/      page image -> anyres crops + high-res view -> Hybrid Encoder -> visual tokens
    llm/         visual tokens + prompt -> llama.cpp -> answer and log-probabilities
    bundles/     which weight files make a model; downloads
    qa/          ask, chat, batch: documents + vision + llm put together (train/, eval/ beside it)
    cli/         the ``fila`` command: options in, output out

``config``, ``errors``, ``gguf_files``, ``atomic_files`` and ``caches`` (the cache folder, its layout and
cap) sit below them all. This module exports what a user of the library needs; the rest (metrics, training,
the encoder's parts) is imported from its own module, e.g. ``fila_cli.eval.anls``, ``fila_cli.train.config``.

Imports are lazy: ``import fila_cli`` does not load torch, so ``fila --help`` and
``fila weights`` start fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # the front door
    "load": "qa.model",
    "Model": "qa.model",
    # what it returns and takes
    "Answer": "qa.records",
    "ChatSession": "qa.chat",
    "AskOptions": "qa.options",
    "BatchOptions": "qa.options",
    "ModelOptions": "qa.options",
    # where the answer lies on the page
    "locate_answer": "documents.evidence",
    "Evidence": "documents.evidence",
    "EvidenceBox": "documents.evidence",
    "crop_boundary_notice": "documents.evidence",
    "SamplingParams": "llm.sampling",
    "BatchSummary": "qa.run",
    # finer control: the loaded model, a batch in your own loop, documents
    "Asker": "qa.ask",
    "run_batch": "qa.batch",
    "RecordSink": "qa.run",
    "open_document": "documents.document",
    "resolve_bundle": "bundles.bundle",
    "write_sample_invoice": "documents.sample",
    # errors (each with its exit code and record kind)
    "FilaError": "errors",
    "UsageError": "errors",
    "DocumentError": "errors",
    "ModelError": "errors",
    "ExitCode": "errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fila_cli' has no attribute {name!r}")
