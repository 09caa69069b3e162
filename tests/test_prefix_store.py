"""LLM prefix states on disk: a restored state answers exactly as a fresh prefill, a second process
reuses it without decoding the image (counted), damaged entries are recomputed, the LRU cap evicts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tiny_bundle import LLM_FILE, build_tiny_bundle
from tiny_vision import TINY_LLM_WIDTH

from fila_cli.llm import LlamaBackend, SamplingParams
from fila_cli.llm.prefix_store import PrefixStore, prefix_cache_key
from fila_cli.llm.templates import FAMILIES

N_VISUAL = 300  # image rows: more than one n_batch chunk of the tiny model's prefill
GREEDY = SamplingParams(max_tokens=10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def prompt():
    before, after = FAMILIES["vicuna"].render("What is the total due?")
    visual = np.random.default_rng(0).standard_normal((N_VISUAL, TINY_LLM_WIDTH)).astype(np.float32)
    return before, visual, after


def test_a_state_from_disk_answers_as_a_fresh_prefill(bundle, prompt, tmp_path):
    before, visual, after = prompt
    store = PrefixStore(tmp_path / "prefix")
    with LlamaBackend(bundle / LLM_FILE, n_ctx=1024) as first:
        fresh = first.generate([before, visual, after], GREEDY)
        first.prefill([before, visual])
        store.put("page", first.save_state())
    with LlamaBackend(bundle / LLM_FILE, n_ctx=1024) as second:  # a new model instance, as a new process has
        state = store.get("page", second)
        assert state is not None
        restored = second.generate_from_state(state, [after], GREEDY)
        assert second.stats.embedding_rows == 0, "the image was decoded again instead of restored"
        assert second.stats.text_tokens == len(second.tokenize(after)), "only the question's text is decoded"
    assert restored.token_ids == fresh.token_ids and restored.text == fresh.text
    assert restored.mean_logprob == pytest.approx(fresh.mean_logprob, abs=1e-5)
    assert (restored.n_prompt_tokens, restored.n_visual_tokens) == (fresh.n_prompt_tokens, fresh.n_visual_tokens)


def test_damaged_entries_are_dropped_and_the_lru_cap_evicts_the_oldest(bundle, prompt, tmp_path):
    before, visual, _ = prompt
    with LlamaBackend(bundle / LLM_FILE, n_ctx=1024) as backend:
        backend.prefill([before, visual])
        state = backend.save_state()
        store = PrefixStore(tmp_path / "prefix")
        store.put("a", state)
        entry = store.directory / "a.llstate"
        size = entry.stat().st_size
        # Truncated (a disk filled up, a copy cut short): not loaded, removed.
        entry.write_bytes(entry.read_bytes()[: size // 2])
        assert store.get("a", backend) is None and not entry.exists()
        # One flipped byte inside the state: the checksum refuses it.
        store.put("a", state)
        data = bytearray(entry.read_bytes())
        data[-100] ^= 0xFF
        entry.write_bytes(bytes(data))
        assert store.get("a", backend) is None and not entry.exists()
        # LRU: room for two entries; "a" is used after "b", so "b" is the one evicted by "c".
        capped = PrefixStore(tmp_path / "capped", max_bytes=int(size * 2.5))
        capped.put("a", state)
        capped.put("b", state)
        assert capped.get("a", backend) is not None
        capped.put("c", state)
        assert sorted(p.stem for p in capped.directory.glob("*.llstate")) == ["a", "c"]
        assert capped.info().entries == 2 and capped.info().bytes <= capped.max_bytes
        assert capped.clear() == 2 and capped.info().entries == 0


def test_keys_change_with_everything_the_state_depends_on():
    base = prefix_cache_key("llm", 4096, ["page"], ["USER: "])
    assert base == prefix_cache_key("llm", 4096, ["page"], ["USER: "])
    others = [prefix_cache_key("llm2", 4096, ["page"], ["USER: "]), prefix_cache_key("llm", 2048, ["page"], ["USER: "]),
              prefix_cache_key("llm", 4096, ["page2"], ["USER: "]), prefix_cache_key("llm", 4096, ["page"], ["[INST] "]),
              prefix_cache_key("llm", 4096, ["page"], ["USER: "], flash_attn=False),
              prefix_cache_key("llm", 4096, ["page"], ["USER: "], n_seq_max=3)]  # fila batch --parallel 3's context
    assert base not in others and len(set(others)) == len(others)
    assert base == prefix_cache_key("llm", 4096, ["page"], ["USER: "], n_seq_max=1)  # the keys of before


ASK_ONCE = textwrap.dedent("""
    import json, sys
    from fila_cli import Asker, ModelOptions, AskOptions, SamplingParams
    asker = Asker.from_options(ModelOptions(model=sys.argv[1], device="cpu", dtype="float32"))
    answer = asker.ask(sys.argv[2], "What is the total due?", AskOptions(sampling=SamplingParams(max_tokens=8)))
    print(json.dumps({"answer": answer.answer, "confidence": answer.confidence,
                      "embedding_rows": asker.backend.stats.embedding_rows, "text_tokens": asker.backend.stats.text_tokens}))
""")


def test_a_second_process_loads_the_page_instead_of_prefilling(bundle, tmp_path):
    from bad_documents import make_good_pdf

    pdf = make_good_pdf(tmp_path / "invoice.pdf", ["Total due: 42.00 EUR. Signed by Ada."])
    runs = []
    for _ in range(2):
        completed = subprocess.run([sys.executable, "-c", ASK_ONCE, str(bundle), str(pdf)], capture_output=True,
                                   text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr
        runs.append(json.loads(completed.stdout))
    first, second = runs
    assert first["embedding_rows"] > 576 and second["embedding_rows"] == 0, "the second process decoded the image"
    assert second["text_tokens"] < first["text_tokens"], "the second process decoded the prompt start again"
    assert second["answer"] == first["answer"] and second["confidence"] == pytest.approx(first["confidence"], abs=1e-6)
    # fila chat on the same page starts from the same stored state.
    chat = subprocess.run([sys.executable, "-c", CHAT_ONCE, str(bundle), str(pdf)], capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout) == {"embedding_rows": 0, "answer": first["answer"]}
    info = subprocess.run([sys.executable, "-m", "fila_cli", "cache", "info"], capture_output=True, text=True, timeout=120)
    assert "1 LLM prefix states" in info.stdout and "against one cap for both" in info.stdout, info.stdout


CHAT_ONCE = textwrap.dedent("""
    import json, sys
    from fila_cli import Asker, ModelOptions, AskOptions, SamplingParams, open_document
    from fila_cli import ChatSession
    asker = Asker.from_options(ModelOptions(model=sys.argv[1], device="cpu", dtype="float32"))
    with open_document(sys.argv[2]) as document:
        session = ChatSession(asker, document, AskOptions(sampling=SamplingParams(max_tokens=8)))
        turn = session.ask("What is the total due?")
    print(json.dumps({"embedding_rows": asker.backend.stats.embedding_rows, "answer": turn.answer}))
""")


def test_one_cap_evicts_the_least_recently_used_entries_across_both_stores(bundle, prompt, tmp_path):
    """Visual tokens and prefix states share fila's cache cap: a prefix state's write evicts an
    older page of tokens, a page of tokens' write evicts an older prefix state, and a hit counts as a use."""
    import torch

    from fila_cli.config import AnyresConfig
    from fila_cli.disk_cache import CacheBudget
    from fila_cli.documents.canvas import plan_canvas
    from fila_cli.documents.notices import ReadNotices
    from fila_cli.llm.prefix_store import PREFIX_DIR_NAME
    from fila_cli.vision.model.encoder import EncodedPage
    from fila_cli.vision.token_cache import TokenCache

    before, visual, _ = prompt
    budget = CacheBudget(tmp_path / "cache", max_bytes=1 << 40)
    tokens = TokenCache(budget.root, budget)
    states = PrefixStore(budget.root / PREFIX_DIR_NAME, budget=budget)
    page = EncodedPage(torch.randn(N_VISUAL, TINY_LLM_WIDTH), plan_canvas((1100, 850), AnyresConfig()))

    def size(name: str) -> int:
        return sum(entry.bytes for entry in budget.entries() if entry.path.name.startswith(name))

    def present() -> set[str]:
        return {entry.path.name.split(".")[0] for entry in budget.entries()}

    with LlamaBackend(bundle / LLM_FILE, n_ctx=1024) as backend:
        backend.prefill([before, visual])
        state = backend.save_state()
        states.put("p1", state)
        tokens.put("t1", page, ReadNotices())
        tokens.put("t2", page, ReadNotices())
        assert states.get("p1", backend) is not None  # a hit: p1 is now newer than t1 and t2
        assert present() == {"p1", "t1", "t2"}
        # Room for t2 and two states: the least recently used entry, the page of tokens t1, goes.
        budget.max_bytes = size("t2") + 2 * size("p1")
        states.put("p2", state)
        assert present() == {"p1", "p2", "t2"}, "a prefix state's write did not evict the oldest page of tokens"
        assert tokens.get("t2") is not None  # t2 is now the newest; p1 the oldest
        budget.max_bytes = size("t2") + size("p2") + size("t2")
        tokens.put("t3", page, ReadNotices())
        assert present() == {"p2", "t2", "t3"}, "a page of tokens' write did not evict the oldest prefix state"
        assert budget.used_bytes() <= budget.max_bytes
        # Both stores still answer for what they kept, and only for that.
        assert tokens.get("t1") is None and tokens.get("t3") is not None and states.get("p1", backend) is None
        assert states.get("p2", backend) is not None


def test_a_stored_state_llama_cpp_refuses_is_decoded_again(bundle, tmp_path, monkeypatch):
    """A state on disk that passes the store's checks but that llama.cpp will not restore (here,
    saved by a context without flash attention) is dropped and the prefix decoded again."""
    from bad_documents import make_good_pdf

    from fila_cli import Asker, AskOptions, ModelOptions
    from fila_cli.llm import LlamaSettings, StateRefusedError

    monkeypatch.setenv("FILA_CACHE_DIR", str(tmp_path / "cache"))
    pdf = make_good_pdf(tmp_path / "invoice.pdf", ["Total due: 42.00 EUR."])
    options = AskOptions(sampling=SamplingParams(max_tokens=6))
    asker = Asker.from_options(ModelOptions(model=str(bundle), device="cpu", dtype="float32"))
    first = asker.ask(pdf, "What is the total due?", options)
    (stored,) = list((tmp_path / "cache").rglob("*.llstate"))
    key = stored.name.removesuffix(".llstate")
    with LlamaBackend(bundle / LLM_FILE, n_ctx=asker.backend.n_ctx, settings=LlamaSettings(flash_attn=False)) as other:
        other.prefill([asker.template.render("What is the total due?")[0]])
        foreign = other.save_state()
    with pytest.raises(StateRefusedError):
        asker.backend.load_state(foreign)
    asker.prefix_store.put(key, foreign)
    again = Asker.from_options(ModelOptions(model=str(bundle), device="cpu", dtype="float32")).ask(
        pdf, "What is the total due?", options)
    assert again.answer == first.answer and again.confidence == pytest.approx(first.confidence, abs=1e-6)
    assert asker.prefix_store.get(key, asker.backend) is not None  # decoded again and stored again
