"""LlamaBackend against real llama.cpp on tiny random GGUF LLMs (tests/helpers/tiny_llm.py); no mocks.

References are independent of the backend's own code paths: the token-embedding matrix read back
from the GGUF with ``gguf.GGUFReader``, and llama-cpp-python's own ``Llama.eval``/``generate`` (on
a second ``Llama`` with ``logits_all=True`` for log-probabilities).
"""

from __future__ import annotations

import math

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFWriter

from fila_cli.errors import ExitCode, ModelError
from fila_cli.llm import ContextOverflowError, LlamaBackend, SamplingParams
from fila_cli.llm.backend import IMAGE_PLACEHOLDER_ID
from fila_cli.llm.sampling import TextStream
from tests.helpers.tiny_llm import BOS_ID, EOS_ID, build_large_llm, build_tiny_llm, gguf_token_embeddings

N_CTX = 512
N_EMBD = 64
SMALL_BATCH = 8  # smaller than every prompt below: decoding crosses chunk boundaries
LOGIT_ATOL = 1e-4  # identical math, possibly a different reduction order across batch sizes
LOGPROB_ATOL = 1e-4

PROMPT = "USER: What is the total of the table in this document? ASSISTANT:"
BEFORE = "A chat between a curious human and an assistant. USER: "
IMAGE_TEXT = "the chart shows the total value for each year"  # stands in for an image
AFTER = "\nWhat is the total? ASSISTANT:"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny.gguf", n_embd=N_EMBD, seed=0)


@pytest.fixture(scope="module")
def token_embeddings(model_path) -> np.ndarray:
    return gguf_token_embeddings(model_path)


@pytest.fixture(scope="module")
def backend(model_path):
    with LlamaBackend(model_path, n_ctx=N_CTX) as b:
        yield b


@pytest.fixture(scope="module")
def small_batch_backend(model_path):
    with LlamaBackend(model_path, n_ctx=N_CTX, n_batch=SMALL_BATCH) as b:
        yield b


@pytest.fixture(scope="module")
def reference(model_path):
    """llama-cpp-python alone, every position's logits kept."""
    llm = llama_cpp.Llama(str(model_path), n_ctx=N_CTX, logits_all=True, verbose=False)
    yield llm
    llm.close()


def reference_logits(backend: LlamaBackend, ids: list[int]) -> np.ndarray:
    """Last-position logits after llama-cpp-python's own ``Llama.eval`` of ``ids``."""
    backend.reset()
    backend.llama.eval(ids)
    return backend.last_logits()


def image_prompt(backend: LlamaBackend, token_embeddings: np.ndarray):
    """Segments [text, embeddings, text] whose embeddings are the rows of IMAGE_TEXT's tokens,
    and the equivalent token ids."""
    image_ids = backend.tokenize(IMAGE_TEXT)
    ids = backend.tokenize(BEFORE, at_start=True) + image_ids + backend.tokenize(AFTER)
    return [BEFORE, token_embeddings[image_ids], AFTER], ids


# --- (a) embedding rows decode exactly as their tokens ------------------------------------------


@pytest.mark.parametrize("fixture", ["backend", "small_batch_backend"])
def test_token_embeddings_decode_like_token_ids(request, fixture, token_embeddings):
    b: LlamaBackend = request.getfixturevalue(fixture)
    ids = b.tokenize(PROMPT, at_start=True)
    assert ids[0] == BOS_ID and len(ids) > 2 * SMALL_BATCH
    b.prefill([token_embeddings[ids]])
    from_embeddings = b.last_logits()
    assert b.n_past == len(ids)
    assert (b.llama.input_ids[: len(ids)] == IMAGE_PLACEHOLDER_ID).all()
    from_ids = reference_logits(b, ids)
    np.testing.assert_allclose(from_embeddings, from_ids, rtol=0, atol=LOGIT_ATOL)
    # A different prompt gives different logits: the comparison can fail.
    other = reference_logits(b, ids[:-1])
    assert np.abs(other - from_ids).max() > 100 * LOGIT_ATOL


def test_chunked_and_unchunked_embeddings_agree(backend, small_batch_backend, token_embeddings):
    ids = backend.tokenize(PROMPT, at_start=True)
    backend.prefill([token_embeddings[ids]])
    small_batch_backend.prefill([token_embeddings[ids]])
    np.testing.assert_allclose(small_batch_backend.last_logits(), backend.last_logits(), rtol=0, atol=LOGIT_ATOL)


# --- (b) the KV cache keeps the image -----------------------------------------------------------


@pytest.mark.parametrize("fixture", ["backend", "small_batch_backend"])
def test_text_embeddings_text_prefill_matches_ids(request, fixture, token_embeddings):
    b: LlamaBackend = request.getfixturevalue(fixture)
    segments, ids = image_prompt(b, token_embeddings)
    b.prefill(segments)
    mixed = b.last_logits()
    assert b.n_past == len(ids)
    np.testing.assert_allclose(mixed, reference_logits(b, ids), rtol=0, atol=LOGIT_ATOL)


def test_generation_after_embeddings_matches_generation_after_ids(backend, model_path, token_embeddings):
    """Generation evals each new token through Llama.eval, which drops every KV cell at or past
    Llama.n_tokens: only right bookkeeping keeps the image in the cache."""
    segments, ids = image_prompt(backend, token_embeddings)
    n_new = 12
    answer = backend.generate(segments, SamplingParams(max_tokens=n_new))
    llm = llama_cpp.Llama(str(model_path), n_ctx=N_CTX, verbose=False)
    expected = []
    for token in llm.generate(ids, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(expected) == n_new:
            break
        expected.append(token)
    llm.close()
    assert answer.token_ids == expected
    assert answer.n_generated == n_new
    assert len(set(expected)) > 1  # a non-degenerate answer: an erased image would change it


# --- (c) greedy generation ----------------------------------------------------------------------


def test_greedy_generation_is_deterministic_and_stops_at_max_tokens(backend, token_embeddings):
    segments, _ = image_prompt(backend, token_embeddings)
    params = SamplingParams(max_tokens=10)
    first = backend.generate(segments, params)
    backend.generate(["something else entirely"], params)  # must not leak into the next answer
    second = backend.generate(segments, params)
    assert first.token_ids == second.token_ids and first.text == second.text
    assert first.n_generated == 10 and first.stop_reason == "max_tokens"
    assert EOS_ID not in first.token_ids
    assert (first.n_prompt_tokens, first.n_visual_tokens) == (
        len(backend.tokenize(BEFORE, at_start=True)) + len(backend.tokenize(AFTER)),
        len(backend.tokenize(IMAGE_TEXT)),
    )
    assert first.prefill_s > 0 and first.generate_s > 0


def test_generation_stops_at_eos(tmp_path):
    path = build_tiny_llm(tmp_path / "eos.gguf", always_eos=True)
    with LlamaBackend(path, n_ctx=128) as b:
        pieces = []
        answer = b.generate(["USER: hello ASSISTANT:"], SamplingParams(max_tokens=50), on_text=pieces.append)
    assert answer.stop_reason == "eos"
    assert answer.n_generated == 0 and answer.text == "" and pieces == []
    assert answer.mean_logprob < 0 and answer.mean_logprob > math.log(0.5)  # EOS sampled, and likely


def test_sampling_with_temperature_follows_the_seed(backend):
    prompt = [PROMPT]
    hot = lambda seed: SamplingParams(max_tokens=16, temperature=1.5, seed=seed)  # noqa: E731
    a, b = backend.generate(prompt, hot(1)), backend.generate(prompt, hot(1))
    assert a.token_ids == b.token_ids
    others = [backend.generate(prompt, hot(seed)).token_ids for seed in (2, 3, 4)]
    assert any(o != a.token_ids for o in others)
    # top_p this small keeps only the most likely token: sampling becomes greedy.
    nucleus = backend.generate(prompt, SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=5))
    assert nucleus.token_ids == backend.generate(prompt, SamplingParams(max_tokens=16)).token_ids


# --- (d) mean log-probability -------------------------------------------------------------------


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_mean_logprob_matches_an_independent_recomputation(backend, reference, token_embeddings):
    segments, ids = image_prompt(backend, token_embeddings)
    answer = backend.generate(segments, SamplingParams(max_tokens=8))
    reference.reset()
    reference.eval(ids + answer.token_ids)
    # Row i of scores predicts token i+1: the answer's tokens are predicted by rows len(ids)-1 ...
    rows = reference.scores[len(ids) - 1 : len(ids) - 1 + answer.n_generated]
    expected = [log_softmax(row)[token] for row, token in zip(rows, answer.token_ids)]
    assert answer.mean_logprob == pytest.approx(np.mean(expected), abs=LOGPROB_ATOL)
    assert answer.token_ids == [int(np.argmax(row)) for row in rows]  # greedy means argmax


# --- prefix reuse -------------------------------------------------------------------------------


def test_generation_from_a_saved_prefix_equals_a_full_decode(backend, small_batch_backend, token_embeddings):
    for b in (backend, small_batch_backend):
        segments, _ = image_prompt(b, token_embeddings)
        params = SamplingParams(max_tokens=10)
        b.prefill(segments[:2])  # system text + image
        state = b.save_state()
        for question in (AFTER, "\nWho wrote it? ASSISTANT:"):
            full = b.generate([segments[0], segments[1], question], params)
            b.generate(["unrelated prompt in between"], params)
            reused = b.generate_from_state(state, [question], params)
            assert reused.token_ids == full.token_ids and reused.text == full.text
            assert (reused.n_prompt_tokens, reused.n_visual_tokens) == (full.n_prompt_tokens, full.n_visual_tokens)


# --- streaming ----------------------------------------------------------------------------------


def test_streamed_pieces_join_to_the_text(backend):
    pieces: list[str] = []
    answer = backend.generate([PROMPT], SamplingParams(max_tokens=24), on_text=pieces.append)
    assert "".join(pieces) == answer.text and answer.text == answer.text.lstrip()
    raw = b"".join(backend.token_bytes(t) for t in answer.token_ids).decode("utf-8", errors="replace")
    assert answer.text == raw.lstrip()


def test_text_stream_holds_back_split_utf8():
    pieces: list[str] = []
    stream = TextStream(pieces.append)
    encoded = " é日".encode()  # 1 + 2 + 3 bytes, fed one byte at a time
    for i in range(len(encoded)):
        stream.push(encoded[i : i + 1])
    stream.close()
    assert pieces == ["é", "日"] and stream.text == "é日"


# --- errors -------------------------------------------------------------------------------------


def test_a_fixed_context_overflow_is_a_clear_error(model_path):
    with LlamaBackend(model_path, n_ctx=64, grow=False) as b:  # as --ctx-size 64 asks
        rows = np.zeros((100, N_EMBD), np.float32)
        with pytest.raises(ContextOverflowError) as info:
            b.generate(["USER: ", rows, "\nhi ASSISTANT:"])
        assert b.n_ctx == 64  # never grown
    message = str(info.value)
    assert str(info.value.n_needed) in message and info.value.n_needed > 100
    # The options were fine: the context is too small. A model limit, exit 4 (not 2).
    assert isinstance(info.value, ModelError) and info.value.exit_code == ExitCode.MODEL
    # The real limit, and what would make the prompt fit.
    assert "the context holds 64 tokens (--ctx-size)" in message
    assert "raise --ctx-size up to 4096, what the model was trained on" in message


def test_the_context_grows_for_a_long_prompt_and_answers_as_a_context_of_that_size(model_path):
    rows = np.random.default_rng(5).standard_normal((300, N_EMBD)).astype(np.float32)
    prompt = ["USER: ", rows, "\nhi ASSISTANT:"]
    params = SamplingParams(max_tokens=8)
    notes: list[str] = []
    with LlamaBackend(model_path, n_ctx=64) as b:
        b.on_context_note = notes.append
        assert "grown as prompts need up to 4096" in b.context_summary
        grown = b.generate(prompt, params)
        n_needed = grown.n_prompt_tokens + grown.n_visual_tokens
        # Room for the prompt and a default answer, in llama.cpp's steps of 256 cells.
        assert b.n_ctx == 768 and b.n_ctx >= n_needed + 256
        assert notes == [f"LLM context grown from 64 to 768 tokens for a {n_needed + 1}-token prompt "
                         "(at most 4096: what tiny-llama was trained on)"]
        again = b.generate(prompt, params)  # the grown context is kept: no second note
        assert len(notes) == 1 and again.token_ids == grown.token_ids
    with LlamaBackend(model_path, n_ctx=768) as fresh:  # the same answer as a context made that large
        expected = fresh.generate(prompt, params)
    assert grown.token_ids == expected.token_ids
    assert grown.mean_logprob == pytest.approx(expected.mean_logprob, abs=LOGPROB_ATOL)


def test_the_context_is_capped_at_what_the_model_was_trained_for(tmp_path):
    trained = 256
    path = build_tiny_llm(tmp_path / "short.gguf", n_embd=N_EMBD, n_ctx_train=trained)
    with LlamaBackend(path, n_ctx=1024) as b:
        assert (b.n_ctx, b.n_ctx_train) == (trained, trained)
        assert f"trained on a {trained}-token context" in b.context_note and "1024 asked" in b.context_note
        with pytest.raises(ContextOverflowError) as info:
            b.generate(["USER: ", np.zeros((300, N_EMBD), np.float32), "\nhi ASSISTANT:"])
        assert f"the context holds at most {trained} tokens, what tiny-llama was trained on" in str(info.value)
        assert "use a model trained on a longer context" in str(info.value)
    with LlamaBackend(path, n_ctx=128) as b:  # asking for less than the training is granted as asked
        assert b.n_ctx == 128 and b.context_note is None


def test_a_context_memory_cannot_hold_is_refused_naming_memory(model_path, monkeypatch):
    import fila_cli.llm.backend as backend_module
    from fila_cli.llm.context_size import Memory

    per_token = 2 * 4 * (16 + 16) * 2  # tiny: 2 layers x 4 KV heads x (K 16 + V 16 dims) x f16
    # Memory for 512 more positions of KV cache, at the safety fraction: the context stops at 576 + 64.
    monkeypatch.setattr(backend_module, "available_memory", lambda on_gpu: Memory(2 * 512 * per_token, "RAM"))
    with LlamaBackend(model_path, n_ctx=64) as b:
        assert b.kv_shape.bytes_per_token == per_token
        limit = b.context_limit()
        assert (limit.kind, limit.n_ctx) == ("memory", 512)
        with pytest.raises(ContextOverflowError) as info:
            b.generate(["USER: ", np.zeros((600, N_EMBD), np.float32), "\nhi ASSISTANT:"])
        assert "the context holds at most 512 tokens, what memory allows (512 bytes of KV cache a token" in str(info.value)
        assert "free memory" in str(info.value)
        assert b.n_ctx == 64


def test_the_kv_cache_cost_a_token_is_what_llama_cpp_allocates(tmp_path, capfd):
    """kv_shape's bytes a position against llama.cpp's own log of the KV cache it made, for a
    grouped-query model (2 KV heads for 8 query heads, as Mistral's 8 for 32)."""
    import re

    path = build_large_llm(tmp_path / "gqa.gguf", n_embd=256, n_layer=3, n_head=8, n_head_kv=2, n_ff=64)
    with LlamaBackend(path, n_ctx=1024, verbose=True) as b:
        per_token = b.kv_shape.bytes_per_token
    log = capfd.readouterr().err
    sizes = re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells", log)
    assert sizes, log[-2000:]
    mib, cells = float(sizes[-1][0]), int(sizes[-1][1])
    assert per_token == 3 * 2 * (32 + 32) * 2
    assert mib * 1024 * 1024 == pytest.approx(per_token * cells)


def test_visual_tokens_of_the_wrong_width_are_a_model_error(backend):
    with pytest.raises(ModelError, match="32.*64 wide"):
        backend.prefill(["USER: ", np.zeros((4, 32), np.float32)])


def test_missing_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="missing.gguf.*no such LLM file"):
        LlamaBackend(tmp_path / "missing.gguf")


@pytest.mark.parametrize("content", [b"", b"not a gguf at all" * 100, b"GGUF\x03\x00\x00\x00garbage"])
def test_garbage_file_is_a_model_error(tmp_path, content):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="garbage.gguf"):
        LlamaBackend(path)


def test_truncated_llm_is_a_model_error(tmp_path, model_path):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(model_path.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated.gguf"):
        LlamaBackend(path)


def test_vision_projector_gguf_is_not_an_llm(tmp_path):
    path = tmp_path / "mmproj.gguf"
    writer = GGUFWriter(str(path), "clip")
    writer.add_tensor("mm.0.weight", np.zeros((8, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="mmproj.gguf.*vision projector"):
        LlamaBackend(path)


# --- (f) llama.cpp stays quiet ------------------------------------------------------------------


def test_llama_cpp_logs_nothing_unless_verbose(model_path, capfd):
    capfd.readouterr()
    with LlamaBackend(model_path, n_ctx=128) as b:
        b.generate(["USER: hello ASSISTANT:"], SamplingParams(max_tokens=4))
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out == ""
    # The same with verbose=True does print llama.cpp's log: the check above can fail.
    with LlamaBackend(model_path, n_ctx=128, verbose=True) as b:
        b.generate(["USER: hello ASSISTANT:"], SamplingParams(max_tokens=4))
    loud = capfd.readouterr()
    assert "llama" in loud.err
    with LlamaBackend(model_path, n_ctx=128):  # back to quiet for whoever comes next
        pass
    assert capfd.readouterr().err == ""


# --- properties ---------------------------------------------------------------------------------


def test_properties(backend, tmp_path):
    assert backend.n_embd == N_EMBD and backend.n_ctx == N_CTX
    assert backend.model_name == "tiny-llama" and backend.chat_template is None
    assert backend.eos == EOS_ID and backend.bos == BOS_ID and backend.token_text(BOS_ID) == "<s>"
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    path = build_tiny_llm(tmp_path / "templated.gguf", chat_template=template, name="")
    with LlamaBackend(path, n_ctx=64) as b:
        assert b.chat_template == template and b.model_name == "templated"


def test_bos_is_added_once(backend):
    ids = backend.tokenize("hello", at_start=True)
    assert ids[0] == BOS_ID and ids[1] != BOS_ID
    assert backend.tokenize("<s>hello", at_start=True) == ids  # the template's own BOS is kept, not doubled
    assert BOS_ID not in backend.tokenize("hello")  # BOS only at the very start


def test_the_settings_reach_llama_cpp_and_keep_the_answer(model_path, backend, token_embeddings):
    # Batch sizes, flash attention and threads change how llama.cpp computes, not what: the image
    # prefilled through embeddings gives the same greedy answer under every setting.
    from fila_cli.llm.backend import LlamaSettings, physical_cores

    image = token_embeddings[[5, 9, 13, 40, 41, 42, 43, 44, 45, 46]]
    params = SamplingParams(max_tokens=6)
    expected = backend.generate([BEFORE, image, AFTER], params).token_ids
    assert backend.llama.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # the default
    settings = LlamaSettings(n_batch=4, n_ubatch=2, flash_attn=False, n_threads=1, n_threads_batch=1)
    with LlamaBackend(model_path, n_ctx=N_CTX, settings=settings) as other:
        context = other.llama.context_params
        assert (other.llama.n_batch, llama_cpp.llama_n_ubatch(other.llama.ctx)) == (4, 2)
        assert context.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        assert (context.n_threads, context.n_threads_batch) == (1, 1)
        assert other.generate([BEFORE, image, AFTER], params).token_ids == expected
    assert backend.llama.context_params.n_threads == physical_cores() >= 1


def test_the_llama_cpp_python_range_pinned_is_the_one_internals_is_written_for():
    """_internals uses llama-cpp-python's private members: pyproject.toml pins the releases it is
    tested with, and the installed one is among them."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from fila_cli.llm._internals import TESTED_LLAMA_CPP_PYTHON

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = [Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("llama-cpp-python")]
    assert [p.specifier for p in pins] == [SpecifierSet(TESTED_LLAMA_CPP_PYTHON)]
    assert version("llama-cpp-python") in pins[0].specifier
