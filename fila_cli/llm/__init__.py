"""The language model: a GGUF LLM run by llama.cpp, fed text and visual-token embeddings.

- ``backend``: ``LlamaBackend`` (prefill of text + embedding segments, generation, prefix reuse).
- ``sampling``: ``SamplingParams`` (greedy by default) and streaming/log-probability helpers.
- ``templates``: prompt templates per model family, or from the GGUF's own chat template.
"""

from .backend import ContextOverflowError, Generation, LlamaBackend, PrefixState, Segment
from .sampling import SamplingParams
from .templates import PromptTemplate, select_template, template_from_chat_template

__all__ = [
    "ContextOverflowError",
    "Generation",
    "LlamaBackend",
    "PrefixState",
    "PromptTemplate",
    "SamplingParams",
    "Segment",
    "select_template",
    "template_from_chat_template",
]
