"""Visual tokens and text in, an answer out: a GGUF LLM run by llama.cpp.

- ``backend``: ``LlamaBackend`` (prefill of text + embedding segments, generation, prefix reuse).
- ``parallel``: several prompts answered side by side (``LlamaBackend.generate_many``).
- ``generation``: ``Generation`` (an answer and its cost) and the rule that stops an answer.
- ``context_size``: how far the context may grow (trained context, memory), ``ContextOverflowError``.
- ``_internals``: llama.cpp's batches, and every use of llama-cpp-python's private members.
- ``sampling``: ``SamplingParams`` (greedy by default) and streaming/log-probability helpers.
- ``templates``: prompt templates per model family, or from the GGUF's own chat template.

May import the bottom modules (config, errors, gguf_files), never ``vision`` or ``documents``.
Exports are lazy, so ``fila_cli.llm.sampling`` can be read without loading llama.cpp.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS = {
    "ContextOverflowError": "context_size",
    "StateRefusedError": "backend",
    "Generation": "generation",
    "LlamaBackend": "backend",
    "LlamaSettings": "backend",
    "PrefixState": "backend",
    "PrefixStore": "prefix_store",
    "prefix_cache_key": "prefix_store",
    "Segment": "backend",
    "SamplingParams": "sampling",
    "PromptTemplate": "templates",
    "select_template": "templates",
    "template_from_chat_template": "templates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
