"""``LlamaBackend.generate_many``: several prompts answered side by side in one llama.cpp context
(one sequence id and KV cache each, one ``llama_decode`` a step), against ``generate`` of each
prompt alone. Real llama.cpp, tiny random GGUF LLMs (tests/helpers/tiny_llm.py); no mocks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fila_cli.llm import ContextOverflowError, LlamaBackend, LlamaSettings, SamplingParams, StateRefusedError
from tests.helpers.tiny_llm import build_tiny_llm, gguf_token_embeddings

N_CTX = 512
N_EMBD_TINY = 64  # build_tiny_llm's default width
N_SEQ = 3
SMALL_BATCH = 8  # smaller than the prompts: their prefill crosses chunk boundaries
# Batched steps compute each answer's row in a several-token batch: the same math, summed in
# another order by llama.cpp's kernels (the docstring of generate_many): logits differ by up to
# ~1e-3 on this model, its log-probabilities as much.
LOGPROB_ATOL = 5e-3
MAX_TOKENS = 16
# Embedding channel 0 of the always-EOS model (tiny_llm._force_eos) drives the EOS logit: rows
# with it this negative make a prompt whose first answer token is not EOS.
EOS_CHANNEL_AGAINST = -30.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny.gguf", seed=0)


@pytest.fixture(scope="module")
def alone(model_path):
    with LlamaBackend(model_path, n_ctx=N_CTX) as backend:
        yield backend


@pytest.fixture(scope="module", params=[None, SMALL_BATCH], ids=["n_batch-default", "n_batch-8"])
def together(request, model_path):
    with LlamaBackend(model_path, n_ctx=N_CTX, n_batch=request.param, settings=LlamaSettings(n_seq_max=N_SEQ)) as backend:
        yield backend


@pytest.fixture(scope="module")
def prompts(model_path, alone):
    """Three prompts of different lengths: text + embedding rows + text (two) and text alone."""
    rows = gguf_token_embeddings(model_path)
    image = lambda text: rows[alone.tokenize(text)]  # noqa: E731  (embedding rows standing in for an image)
    return [
        ["A chat between a curious human and an assistant. USER: ", image("the chart shows the total value"),
         "\nWhat is the total? ASSISTANT:"],
        ["USER: ", image("hello world this is a document page with a table and a chart " * 3), " Who signed? ASSISTANT:"],
        ["What is the name of the title?"],
    ]


def assert_same_answers(many, single, *, exact_logprob=False):
    for i, (m, s) in enumerate(zip(many, single)):
        assert m.token_ids == s.token_ids, f"prompt {i}"
        assert (m.text, m.stop_reason, m.n_generated) == (s.text, s.stop_reason, s.n_generated), f"prompt {i}"
        assert (m.n_prompt_tokens, m.n_visual_tokens) == (s.n_prompt_tokens, s.n_visual_tokens), f"prompt {i}"
        if exact_logprob:
            assert m.mean_logprob == s.mean_logprob, f"prompt {i}"
        else:
            assert m.mean_logprob == pytest.approx(s.mean_logprob, abs=LOGPROB_ATOL), f"prompt {i}"


def test_greedy_answers_are_each_prompts_answer_alone(together, alone, prompts):
    params = SamplingParams(max_tokens=MAX_TOKENS)
    single = [alone.generate(prompt, params) for prompt in prompts]
    many = together.generate_many(prompts, params)
    assert_same_answers(many, single)
    # The premises: three different answers (a mix-up of sequences would show), each its full length.
    assert len({tuple(s.token_ids) for s in single}) == len(prompts)
    assert all(s.n_generated == MAX_TOKENS for s in single)
    assert [s.n_visual_tokens > 0 for s in single] == [True, True, False]
    # The times are filled: each prompt's own prefill, its first token, the shared steps.
    for m in many:
        assert m.prefill_s > 0 and 0 < m.first_token_s <= m.generate_s
    # Nothing is left in the context: the single-prompt path answers as before.
    assert together.n_past == 0
    assert together.generate(prompts[0], params).token_ids == single[0].token_ids


def test_a_single_prompt_is_decoded_exactly_as_alone(together, alone, prompts):
    for params in (SamplingParams(max_tokens=MAX_TOKENS), SamplingParams(max_tokens=MAX_TOKENS, temperature=1.2, seed=4)):
        single = alone.generate(prompts[1], params)
        assert_same_answers(together.generate_many([prompts[1]], params), [single], exact_logprob=True)


def test_sampling_follows_each_sequences_own_seeded_chain(together, alone, prompts):
    hot = lambda seed: SamplingParams(max_tokens=MAX_TOKENS, temperature=1.5, top_p=0.9, seed=seed)  # noqa: E731
    many = together.generate_many(prompts, hot(7))
    single = [alone.generate(prompt, hot(7)) for prompt in prompts]
    # Guaranteed: the first token comes from the prompt's own prefill, decoded as alone, and the
    # chain draws as generate's; the group is reproducible.
    assert [m.token_ids[0] for m in many] == [s.token_ids[0] for s in single]
    assert [m.token_ids for m in together.generate_many(prompts, hot(7))] == [m.token_ids for m in many]
    # Here the batched steps' rounding never reaches a draw's boundary, so every answer is the one
    # alone (llama.cpp does not promise it for every model and build: see generate_many).
    assert_same_answers(many, single)
    # The seed reaches every sequence's chain: another seed, other answers.
    others = together.generate_many(prompts, hot(8))
    assert all(o.token_ids != m.token_ids for o, m in zip(others, many))


def test_an_answer_that_fills_its_context_stops_alone_and_the_others_go_on(model_path, prompts):
    n_ctx = 64
    long_prompt = [" ".join(["the total value of the table"] * 9)]  # a few positions short of n_ctx
    group = [prompts[2], long_prompt, prompts[2][:1] + [" hello"]]
    params = SamplingParams(max_tokens=MAX_TOKENS)
    with LlamaBackend(model_path, n_ctx=n_ctx) as one, \
            LlamaBackend(model_path, n_ctx=n_ctx, settings=LlamaSettings(n_seq_max=N_SEQ)) as many:
        single = [one.generate(prompt, params) for prompt in group]
        assert_same_answers(many.generate_many(group, params), single)
    assert [s.stop_reason for s in single] == ["max_tokens", "context_full", "max_tokens"]
    assert 0 < single[1].n_generated < MAX_TOKENS


def test_answers_ending_at_eos_after_different_lengths(tmp_path):
    path = build_tiny_llm(tmp_path / "eos.gguf", always_eos=True)
    rows = gguf_token_embeddings(path)
    params = SamplingParams(max_tokens=MAX_TOKENS)
    with LlamaBackend(path, n_ctx=128) as one, LlamaBackend(path, n_ctx=128, settings=LlamaSettings(n_seq_max=N_SEQ)) as many:
        against_eos = rows[one.tokenize("the chart shows the total value")].copy()
        against_eos[:, 0] = EOS_CHANNEL_AGAINST
        group = [["USER: hello ASSISTANT:"], ["USER: ", against_eos], ["Who signed?"]]
        single = [one.generate(prompt, params) for prompt in group]
        assert_same_answers(many.generate_many(group, params), single)
    assert [(s.stop_reason, s.n_generated) for s in single] == [("eos", 0), ("eos", 1), ("eos", 0)]


def test_each_prompt_has_the_whole_context(model_path, alone):
    # Three prompts of nearly n_ctx positions each: three times what one context would hold.
    rng = np.random.default_rng(0)
    prompts = [[rng.normal(size=(N_CTX - 4, alone.n_embd)).astype(np.float32)] for _ in range(N_SEQ)]
    params = SamplingParams(max_tokens=MAX_TOKENS)
    with LlamaBackend(model_path, n_ctx=N_CTX, settings=LlamaSettings(n_seq_max=N_SEQ)) as many:
        assert many.n_ctx == alone.n_ctx == N_CTX and many.n_seq_max == N_SEQ
        answers = many.generate_many(prompts, params)
    single = [alone.generate(prompt, params) for prompt in prompts]
    assert_same_answers(answers, single)
    assert [s.stop_reason for s in single] == ["context_full"] * N_SEQ


def test_a_prompt_past_the_context_is_refused_before_anything_is_decoded(together, prompts):
    trained = 4096  # tiny_llm's GGUF: past it the context never grows
    too_long = ["USER: ", np.zeros((trained + 10, together.n_embd), np.float32), " hi"]
    decoded = (together.stats.text_tokens, together.stats.embedding_rows)
    with pytest.raises(ContextOverflowError) as info:
        together.generate_many([prompts[0], too_long], SamplingParams(max_tokens=4))
    assert info.value.n_ctx == trained and info.value.n_needed > trained and together.n_ctx == N_CTX
    assert f"at most {trained} tokens" in str(info.value) and "longer context" in str(info.value)
    assert (together.stats.text_tokens, together.stats.embedding_rows) == decoded, "nothing was decoded"
    assert together.prompt_size(too_long) == info.value.n_needed
    with pytest.raises(ValueError, match="at most 3"):
        together.generate_many([prompts[0]] * (N_SEQ + 1))
    assert together.generate_many([]) == []


def test_every_sequence_s_context_grows_for_the_longest_prompt(model_path, prompts):
    rows = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32)
    group = [prompts[2], ["USER: ", rows, " Who signed? ASSISTANT:"]]
    params = SamplingParams(max_tokens=MAX_TOKENS)
    with LlamaBackend(model_path, n_ctx=64) as one, \
            LlamaBackend(model_path, n_ctx=64, settings=LlamaSettings(n_seq_max=N_SEQ)) as many:
        single = [one.generate(prompt, params) for prompt in group]
        assert_same_answers(many.generate_many(group, params), single)
        assert many.n_ctx == one.n_ctx == 768  # 300 rows + text + a default answer, in steps of 256


def test_without_flash_attention_long_prompts_answer_as_alone_to_rounding(model_path):
    # With flash attention, llama.cpp's CPU build computes a step of several sequences with another
    # attention kernel than a step of one, and on long prompts the logits drift apart by more than
    # rounding (0.04 after 2,448 rows here; generate_many's docstring). Without it they agree to
    # rounding whatever the prompt's length: the answers, and their log-probabilities.
    n_rows, n_ctx = 1500, 2048
    rng = np.random.default_rng(1)
    questions = ["What is the total?", "Who signed the letter?", "Describe the chart."]
    prompts = [["USER: ", rng.normal(size=(n_rows, N_EMBD_TINY)).astype(np.float32), f" {q} ASSISTANT:"] for q in questions]
    params = SamplingParams(max_tokens=MAX_TOKENS)
    settings = LlamaSettings(flash_attn=False)
    with LlamaBackend(model_path, n_ctx=n_ctx, settings=settings) as one, \
            LlamaBackend(model_path, n_ctx=n_ctx, settings=dataclasses.replace(settings, n_seq_max=N_SEQ)) as many:
        single = [one.generate(prompt, params) for prompt in prompts]
        together = many.generate_many(prompts, params)
    for m, s in zip(together, single):
        assert m.token_ids == s.token_ids
        assert m.mean_logprob == pytest.approx(s.mean_logprob, abs=1e-4)
    assert len({tuple(s.token_ids) for s in single}) == N_SEQ


def test_a_saved_state_loads_only_into_a_context_of_as_many_sequences(model_path, alone):
    # Why the prefix store's key holds n_seq_max: llama.cpp refuses a state across sequence counts.
    params = SamplingParams(max_tokens=4)
    with LlamaBackend(model_path, n_ctx=N_CTX, settings=LlamaSettings(n_seq_max=N_SEQ)) as many:
        for source, target in ((alone, many), (many, alone)):
            source.prefill(["USER: hello world what is the total"])
            with pytest.raises(StateRefusedError):
                target.generate_from_state(source.save_state(), [" ASSISTANT:"], params)
        many.prefill(["USER: hello world what is the total"])
        restored = many.generate_from_state(many.save_state(), [" ASSISTANT:"], params)
    assert restored.token_ids == alone.generate(["USER: hello world what is the total", " ASSISTANT:"], params).token_ids
