"""Build a tiny random-weight llama-architecture GGUF LLM at test time (test helper).

The file is written with the real ``gguf`` writer, so llama.cpp loads it exactly as it loads a
converted model: llama hyper-parameters, an F32 (or F16) tensor set named as llama.cpp's
``LLM_ARCH_LLAMA`` expects, and a real SentencePiece-style ("llama") tokenizer:

- control tokens ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS) and the chat-template markers of the
  families in ``fila_cli.llm.templates`` (``<|im_start|>``, ``<|eot_id|>``, ``[INST]``, ...), so
  rendered prompts tokenise their markers as single special tokens;
- the 256 byte-fallback tokens ``<0x00>``..``<0xFF>``, so *any* UTF-8 text tokenises;
- every printable ASCII character, and ``▁word`` pieces (with all their prefixes, so the SPM
  merge loop can reach them) for a small English word list.

Weights are drawn from ``numpy.random.default_rng(seed)``: the same arguments give the same file,
byte for byte. Quantized tiny models segfault on this machine's CPU (DESIGN §5), hence F32/F16.

Public API (others use it in end-to-end tests; keep it stable):

    build_tiny_llm(path, *, n_embd=64, n_layer=2, n_head=4, n_ff=128, vocab=None,
                   chat_template=None, seed=0, n_ctx_train=4096, dtype="f32",
                   name="tiny-llama", always_eos=False) -> Path
    build_large_llm(path, *, n_embd, n_layer, n_head, n_ff, n_head_kv=None, n_vocab=None, ...) -> Path
                                                  # any size (7B-shaped), f16, one tensor in memory
    tiny_llm_tokens(vocab=None) -> list[str]     # the token list, index = token id
    BOS_ID, EOS_ID, UNK_ID                        # special token ids
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from gguf import GGUFReader, GGUFWriter, TokenType

ARCH = "llama"
SPM_SPACE = "\u2581"  # "▁": SentencePiece's visible space
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Markers of the prompt families (templates.py); control tokens, so they tokenise as one id.
TEMPLATE_MARKERS = (
    "[INST]",
    "[/INST]",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
N_BYTES = 256
PRINTABLE_ASCII = [chr(c) for c in range(0x21, 0x7F)]
DEFAULT_WORDS = (
    "a an the of to in on at is are was be it this that what which who how many much where when "
    "why and or not with for from by as chat between curious human artificial intelligence "
    "assistant gives helpful detailed polite answers questions question answer user system you "
    "document page image table chart figure value total number year date name title text read "
    "show shows describe tell me please hello world"
).split()
ROPE_FREQ_BASE = 10000.0
RMS_NORM_EPS = 1e-5
# Scale of the constant channel used by ``always_eos`` (see below); far above the O(1) channels.
ALWAYS_EOS_CHANNEL_VALUE = 30.0
ALWAYS_EOS_LOGIT_GAIN = 4.0


def tiny_llm_tokens(vocab: Sequence[str] | None = None) -> list[str]:
    """The token list (index = id): specials, markers, bytes, ASCII characters, word pieces."""
    words = DEFAULT_WORDS if vocab is None else tuple(vocab)
    tokens = list(SPECIAL_TOKENS) + list(TEMPLATE_MARKERS)
    tokens += [f"<0x{b:02X}>" for b in range(N_BYTES)]
    tokens += [SPM_SPACE] + PRINTABLE_ASCII
    seen = set(tokens)
    for word in words:
        piece = SPM_SPACE + word
        # Every prefix, so the merge loop can grow "▁t" -> "▁th" -> "▁the".
        for end in range(2, len(piece) + 1):
            if piece[:end] not in seen:
                seen.add(piece[:end])
                tokens.append(piece[:end])
    return tokens


def _token_types(tokens: Sequence[str]) -> list[int]:
    n_control = len(SPECIAL_TOKENS) + len(TEMPLATE_MARKERS)
    types = [TokenType.CONTROL] * n_control + [TokenType.BYTE] * N_BYTES
    types += [TokenType.NORMAL] * (len(tokens) - len(types))
    types[UNK_ID] = TokenType.UNKNOWN
    return [int(t) for t in types]


def _token_scores(tokens: Sequence[str], types: Sequence[int]) -> list[float]:
    # SPM merges the adjacent pair whose result has the highest score: longer pieces win.
    return [float(len(t)) if ty == TokenType.NORMAL else 0.0 for t, ty in zip(tokens, types)]


def _random_weights(
    rng: np.random.Generator, *, n_vocab: int, n_embd: int, n_layer: int, n_ff: int
) -> dict[str, np.ndarray]:
    """llama.cpp tensor names -> arrays shaped (out, in) as numpy sees them (gguf reverses)."""
    scale = 1.0 / np.sqrt(n_embd)  # keeps attention scores and logits O(1): outputs depend on context

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    tensors = {"token_embd.weight": normal(n_vocab, n_embd, std=1.0)}
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = np.ones(n_embd, np.float32)
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors[p + proj + ".weight"] = normal(n_embd, n_embd, std=scale)
        tensors[p + "ffn_norm.weight"] = np.ones(n_embd, np.float32)
        tensors[p + "ffn_gate.weight"] = normal(n_ff, n_embd, std=scale)
        tensors[p + "ffn_up.weight"] = normal(n_ff, n_embd, std=scale)
        tensors[p + "ffn_down.weight"] = normal(n_embd, n_ff, std=1.0 / np.sqrt(n_ff))
    tensors["output_norm.weight"] = np.ones(n_embd, np.float32)
    tensors["output.weight"] = normal(n_vocab, n_embd, std=scale * 4)
    return tensors


def _force_eos(tensors: dict[str, np.ndarray]) -> None:
    """Make EOS the greedy choice at every step: channel 0 of every token embedding is a large
    constant, so after the final RMSNorm channel 0 is large and positive whatever the context;
    only the EOS row of the output matrix reads it."""
    tensors["token_embd.weight"][:, 0] = ALWAYS_EOS_CHANNEL_VALUE
    output = tensors["output.weight"]
    output[:, 0] = 0.0
    output[EOS_ID, 0] = ALWAYS_EOS_LOGIT_GAIN


def build_tiny_llm(
    path: str | os.PathLike,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    vocab: Sequence[str] | None = None,
    chat_template: str | None = None,
    seed: int = 0,
    n_ctx_train: int = 4096,
    dtype: Literal["f32", "f16"] = "f32",
    name: str = "tiny-llama",
    always_eos: bool = False,
) -> Path:
    """Write a tiny random llama GGUF LLM to ``path`` and return the path.

    vocab: extra English words for the tokenizer (default: a small built-in list); characters and
        byte fallback make any text tokenise regardless.
    chat_template: stored as ``tokenizer.chat_template`` when given (jinja source).
    dtype: "f32" (default; token embeddings read back bit-exact) or "f16" for the matrices
        (norm weights stay F32, as llama.cpp's converter does).
    always_eos: make greedy decoding emit EOS at the first step (to test stopping).
    """
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens = tiny_llm_tokens(vocab)
    types = _token_types(tokens)
    tensors = _random_weights(rng, n_vocab=len(tokens), n_embd=n_embd, n_layer=n_layer, n_ff=n_ff)
    if always_eos:
        _force_eos(tensors)

    writer = _writer_with_metadata(path, tokens=tokens, types=types, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                   n_ff=n_ff, chat_template=chat_template, n_ctx_train=n_ctx_train, dtype=dtype,
                                   name=name)
    for tensor_name, array in tensors.items():
        if dtype == "f16" and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(tensor_name, array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _writer_with_metadata(path: Path, *, tokens: list[str], types: list[int], n_embd: int, n_layer: int, n_head: int,
                          n_ff: int, chat_template: str | None, n_ctx_train: int, dtype: str, name: str,
                          n_head_kv: int | None = None, rope_freq_base: float = ROPE_FREQ_BASE) -> GGUFWriter:
    """A GGUF writer holding the model's key-values (architecture, tokenizer), no tensors yet."""
    writer = GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv or n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(rope_freq_base)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_file_type(0 if dtype == "f32" else 1)  # llama_ftype: ALL_F32 / MOSTLY_F16

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(_token_scores(tokens, types))
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return writer


# gguf TokenType.UNUSED: the vocabulary rows that pad the tests' tokenizer to a real model's size.
FILLER_TOKEN_TYPE = 5


def build_large_llm(path: str | os.PathLike, *, n_embd: int, n_layer: int, n_head: int, n_ff: int,
                    n_head_kv: int | None = None, n_vocab: int | None = None, n_ctx_train: int = 4096,
                    rope_freq_base: float = ROPE_FREQ_BASE, seed: int = 0, name: str = "large-random-llama") -> Path:
    """The same llama layout as :func:`build_tiny_llm` at any size (e.g. 7B-shaped), in f16, written
    tensor by tensor: memory holds one tensor, not the model (a 7B's f32 weights would need 26 GB).

    ``n_head_kv`` < ``n_head``: grouped-query attention (Mistral). ``n_vocab``: the tests' tokenizer
    padded with unused rows to that size, so prompts tokenise as in the tests while the embedding and
    output matrices have the real model's height. The values differ from ``build_tiny_llm``'s for the
    same seed (drawn in f32, one tensor at a time); only the shapes and the cost of running the model
    matter to its users (benchmarks).
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens = tiny_llm_tokens(None)
    types = _token_types(tokens)
    n_filler = (n_vocab or len(tokens)) - len(tokens)
    if n_filler < 0:
        raise ValueError(f"a vocabulary of {n_vocab} cannot hold the {len(tokens)} tokens of the tests' tokenizer")
    tokens += [f"<unused{i}>" for i in range(n_filler)]
    types += [FILLER_TOKEN_TYPE] * n_filler
    kv_width = (n_head_kv or n_head) * (n_embd // n_head)
    scale = 1.0 / np.sqrt(n_embd)
    # name -> (numpy shape (out, in), std; None: a norm's ones), in the order build_tiny_llm writes them
    layout: dict[str, tuple[tuple[int, ...], float | None]] = {"token_embd.weight": ((len(tokens), n_embd), 1.0)}
    for i in range(n_layer):
        p = f"blk.{i}."
        layout[p + "attn_norm.weight"] = ((n_embd,), None)
        layout[p + "attn_q.weight"] = ((n_embd, n_embd), scale)
        layout[p + "attn_k.weight"] = ((kv_width, n_embd), scale)
        layout[p + "attn_v.weight"] = ((kv_width, n_embd), scale)
        layout[p + "attn_output.weight"] = ((n_embd, n_embd), scale)
        layout[p + "ffn_norm.weight"] = ((n_embd,), None)
        layout[p + "ffn_gate.weight"] = ((n_ff, n_embd), scale)
        layout[p + "ffn_up.weight"] = ((n_ff, n_embd), scale)
        layout[p + "ffn_down.weight"] = ((n_embd, n_ff), 1.0 / np.sqrt(n_ff))
    layout["output_norm.weight"] = ((n_embd,), None)
    layout["output.weight"] = ((len(tokens), n_embd), scale * 4)

    writer = _writer_with_metadata(path, tokens=tokens, types=types, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                   n_ff=n_ff, chat_template=None, n_ctx_train=n_ctx_train, dtype="f16", name=name,
                                   n_head_kv=n_head_kv, rope_freq_base=rope_freq_base)
    for tensor_name, (shape, std) in layout.items():
        dtype = np.dtype(np.float32 if std is None else np.float16)
        writer.add_tensor_info(tensor_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for shape, std in layout.values():
        if std is None:
            writer.write_tensor_data(np.ones(shape, np.float32))
        else:
            writer.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16))
    writer.close()
    return path


def gguf_token_embeddings(path: str | os.PathLike) -> np.ndarray:
    """token_embd.weight [n_vocab, n_embd] as written into the GGUF: rows to prefill as embeddings
    that must decode exactly as their token ids do."""
    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    return np.asarray(tensor.data, dtype=np.float32)
