"""Test-time builders for training: a tiny LLaVA-NeXT checkpoint with a tokenizer and a chat
template (llama or qwen2 language model), and a small synthetic conversation data set.

The tokenizer is character-level (a BPE with no merges, built with the ``tokenizers`` library and
saved as tokenizer.json) with the chat markers as special tokens, so token boundaries are easy to
reason about in the masking tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from fila_cli.config import DEFAULT_GRID_PINPOINTS
from tests.helpers.tiny_vision import (
    TINY_LLM_WIDTH,
    page_image,
    save_llava_next_checkpoint,
    tiny_clip_config,
    tiny_fusion_config,
)

VOCAB_SIZE = 128
IMAGE_TOKEN_INDEX = VOCAB_SIZE - 1
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"]
# Mistral-style (string content): answers end with </s>.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# ChatML (Qwen2): every turn ends with <|im_end|> and a newline.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FULL_CROP_SIZE = 336
# Training tests run many forward/backward passes: crops of 4x4 ViT patches (the paper's canvases
# scaled by 56/336) keep a step well under a second while every shape rule stays the same.
TRAIN_CROP_SIZE = 56
WORDS = "what is the total page number name date value answer yes no".split()


def char_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    assert len(vocab) < IMAGE_TOKEN_INDEX
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()  # characters back to text without spaces between them
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="</s>", additional_special_tokens=SPECIALS[3:],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = chat_template
    return tokenizer


def text_config(arch: str, width: int):
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=8192, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def build_tiny_base(directory: Path, *, arch: str = "llama", seed: int = 0, width: int = TINY_LLM_WIDTH,
                    crop_size: int = TRAIN_CROP_SIZE) -> Path:
    """A LLaVA-NeXT checkpoint directory (config.json, model.safetensors, tokenizer) with random weights.

    crop_size: the ViT's input side; the paper's canvases are scaled with it (336 is full size).
    """
    torch.manual_seed(seed)
    vision = tiny_clip_config()
    vision.image_size = crop_size
    pinpoints = [[h * crop_size // FULL_CROP_SIZE, w * crop_size // FULL_CROP_SIZE] for h, w in DEFAULT_GRID_PINPOINTS]
    config = LlavaNextConfig(vision_config=vision, text_config=text_config(arch, width),
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_token_index=IMAGE_TOKEN_INDEX)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            param.copy_((1.0 if is_norm_scale else 0.0) + torch.randn_like(param) * 0.05)
    save_llava_next_checkpoint(model, directory)
    char_tokenizer(CHATML_TEMPLATE if arch == "qwen2" else MISTRAL_TEMPLATE).save_pretrained(str(directory))
    return directory


def write_fusion_config(path: Path) -> Path:
    from dataclasses import asdict

    path.write_text(json.dumps(asdict(tiny_fusion_config())))
    return path


def write_samples(directory: Path, n: int = 16, *, seed: int = 0) -> tuple[Path, Path]:
    """(data.json, images dir): n one-turn samples over a few small page images; the answer is a
    function of the image so that there is something to learn."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    shapes = [(300, 220), (220, 300), (260, 260)]
    records = []
    for i in range(n):
        name = f"page{i % 4}.png"
        if not (images / name).exists():
            page_image(*shapes[i % 4 % len(shapes)], seed=seed + i % 4).save(images / name)
        answer = WORDS[i % 4]
        records.append({"id": f"s{i}", "image": name,
                        "conversations": [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": answer}]})
    data = directory / "data.json"
    data.write_text(json.dumps(records))
    return data, images


def write_base_gguf(path: Path, base: Path) -> Path:
    """The tiny base checkpoint's language model as a GGUF, as llama.cpp's converter writes it:
    llama.cpp names, q/k rows permuted for llama (fila's exporter, checked against HF logits in the
    tests), the character vocabulary as an SPM ("llama") tokenizer padded to the embedding rows."""
    from gguf import GGUFWriter, TokenType

    from fila_cli.train.base import load_llm
    from fila_cli.train.gguf_export import architecture_of, llm_tensors

    llm = load_llm(base)
    config = llm.config
    arch, _ = architecture_of(config)
    tensors = llm_tensors(llm.state_dict(), config)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(base))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = [token.replace(" ", "\u2581") for token, _ in vocab]
    types = [int(TokenType.CONTROL if token in SPECIALS else TokenType.NORMAL) for token, _ in vocab]
    types[0] = int(TokenType.UNKNOWN)
    for extra in range(len(tokens), config.vocab_size):
        tokens.append(f"<extra_{extra}>")
        types.append(int(TokenType.UNUSED))
    rope = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{config.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer.chat_template)
    for name, array in tensors.items():
        writer.add_tensor(name, array.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
