"""LLM prefix states on disk: a restored state answers exactly as a fresh prefill, a second process
reuses it without decoding the image (counted), damaged entries are recomputed, the LRU cap evicts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fila_cli.caches.folder import CacheFolder
from fila_cli.llm import LlamaBackend, SamplingParams
from fila_cli.llm.prefix_store import PrefixStore, prefix_cache_key
from fila_cli.llm.templates import FAMILIES
from tests.helpers.tiny_bundle import LLM_FILE
from tests.helpers.tiny_vision import TINY_LLM_WIDTH

N_VISUAL = 300  # image rows: more than one n_batch chunk of the tiny model's prefill
GREEDY = SamplingParams(max_tokens=10)


def key(name: str) -> str:
    """A store key (a SHA-256, as the product's keys are) for a readable name."""
    return hashlib.sha256(name.encode()).hexdigest()


@pytest.fixture(scope="module")
def prompt():
    before, after = FAMILIES["vicuna"].render("What is the total due?")
    visual = np.random.default_rng(0).standard_normal((N_VISUAL, TINY_LLM_WIDTH)).astype(np.float32)
    return before, visual, after


def test_a_state_from_disk_answers_as_a_fresh_prefill(bundle, prompt, tmp_path):
    before, visual, after = prompt
    store = PrefixStore(CacheFolder(tmp_path / "cache"))
    with LlamaBackend(bundle / LLM_FILE, n_ctx=1024) as first:
        fresh = first.generate([before, visual, after], GREEDY)
        first.prefill([before, visual])
        store.put(key("page"), first.save_state())
    with LlamaBackend(bundle / LLM_FILE, n_ctx=1024) as second:  # a new model instance, as a new process has
        state = store.get(key("page"))
        assert state is not None
        restored = second.generate_from_state(state, [after], GREEDY)
        assert second.stats.embedding_rows == 0, "the image was decoded again instead of restored"
        assert second.stats.text_tokens == len(second.tokenize(after)), "only the question's text is decoded"
    assert restored.token_ids == fresh.token_ids and restored.text == fresh.text
    assert restored.mean_logprob == pytest.approx(fresh.mean_logprob, abs=1e-5)
    assert (restored.n_prompt_tokens, restored.n_visual_tokens) == (fresh.n_prompt_tokens, fresh.n_visual_tokens)


def same_state(one, other) -> bool:
    return (np.array_equal(one.data, other.data) and np.array_equal(one.input_ids, other.input_ids)
            and (one.n_prompt_tokens, one.n_visual_tokens) == (other.n_prompt_tokens, other.n_visual_tokens))


def safetensors_regions(data: bytes) -> dict[str, tuple[int, int]]:
    """(start, end) in a safetensors file's bytes of the header and of each stored array."""
    n_header = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n_header])
    regions = {"header": (8, 8 + n_header)}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            regions[name] = (8 + n_header + begin, 8 + n_header + end)
    return regions


def test_damaged_entries_are_dropped_and_the_lru_cap_evicts_the_oldest(bundle, prompt, tmp_path):
    before, visual, _ = prompt
    with LlamaBackend(bundle / LLM_FILE, n_ctx=1024) as backend:
        backend.prefill([before, visual])
        state = backend.save_state()
    store = PrefixStore(CacheFolder(tmp_path / "cache"))
    store.put(key("a"), state)
    entry = store.store.path(key("a"))
    good = entry.read_bytes()
    size = len(good)
    # Truncated (a disk filled up, a copy cut short): not loaded, removed.
    entry.write_bytes(good[: size // 2])
    assert store.get(key("a")) is None and not entry.exists()
    # One flipped byte anywhere (the state, the prompt's token ids, the header and its metadata):
    # refused and removed, or, where the flip changes nothing read (JSON padding), the same state.
    regions = safetensors_regions(good)
    ids_start, ids_end = regions["input_ids"]
    state_start, state_end = regions["llama_state"]
    positions = [*range(*regions["header"]), *range(ids_start, ids_end, 3),
                 *range(state_start, state_end, max(1, (state_end - state_start) // 40)), size - 1]
    refused = {"header": 0, "input_ids": 0, "llama_state": 0}
    for position in positions:
        damaged = bytearray(good)
        damaged[position] ^= 0x01
        entry.write_bytes(bytes(damaged))
        got = store.get(key("a"))
        if got is None:
            assert not entry.exists(), f"a damaged entry (byte {position}) was left in place"
            refused[next(name for name, (start, end) in regions.items() if start <= position < end)] += 1
        else:
            assert same_state(got, state), f"byte {position} flipped and the changed state was served"
    # The token ids and the header lie outside the old checksum; every flip there is refused too.
    assert refused["input_ids"] == len(range(ids_start, ids_end, 3))
    assert refused["llama_state"] > 0 and refused["header"] > 0
    # A metadata value changed in place (same length, still valid JSON): refused.
    entry.write_bytes(good.replace(b'"n_visual_tokens":"300"', b'"n_visual_tokens":"301"'))
    assert entry.read_bytes() != good and store.get(key("a")) is None
    # LRU: room for two entries; "a" is used after "b", so "b" is the one evicted by "c".
    capped = PrefixStore(CacheFolder(tmp_path / "capped", max_bytes=int(size * 2.5)))
    capped.put(key("a"), state)
    capped.put(key("b"), state)
    assert capped.get(key("a")) is not None
    capped.put(key("c"), state)
    assert sorted(p.stem for p in capped.directory.glob("*.llstate")) == sorted([key("a"), key("c")])
    assert capped.info().entries == 2 and capped.info().bytes <= capped.max_bytes
    assert capped.clear() == 2 and capped.info().entries == 0


def test_keys_change_with_everything_the_state_depends_on():
    base = prefix_cache_key("llm", 4096, ["page"], ["USER: "])
    assert base == prefix_cache_key("llm", 4096, ["page"], ["USER: "])
    others = [prefix_cache_key("llm2", 4096, ["page"], ["USER: "]), prefix_cache_key("llm", 2048, ["page"], ["USER: "]),
              prefix_cache_key("llm", 4096, ["page2"], ["USER: "]), prefix_cache_key("llm", 4096, ["page"], ["[INST] "]),
              prefix_cache_key("llm", 4096, ["page"], ["USER: "], flash_attn=False),
              prefix_cache_key("llm", 4096, ["page"], ["USER: "], n_seq_max=3),  # fila batch --parallel 3's context
              prefix_cache_key("llm", 4096, ["page"], ["USER: "], lora_identity="adapter")]  # the LLM with a LoRA
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
    from tests.helpers.bad_documents import make_good_pdf

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
    from fila_cli.documents.canvas import plan_canvas
    from fila_cli.documents.notices import ReadNotices
    from fila_cli.vision.model.encoder import EncodedPage
    from fila_cli.vision.token_cache import TokenCache

    before, visual, _ = prompt
    from fila_cli.vision.token_cache import CachedPage

    folder = CacheFolder(tmp_path / "cache", max_bytes=1 << 40)
    budget = folder.budget
    tokens, states = TokenCache(folder), PrefixStore(folder)
    names = {key(name): name for name in ("p1", "p2", "t1", "t2", "t3")}
    page = EncodedPage(torch.randn(N_VISUAL, TINY_LLM_WIDTH), plan_canvas((1100, 850), AnyresConfig()))

    def size(name: str) -> int:
        return sum(entry.bytes for entry in budget.entries() if entry.path.name.startswith(key(name)))

    def present() -> set[str]:
        return {names[entry.path.name.split(".")[0]] for entry in budget.entries()}

    with LlamaBackend(bundle / LLM_FILE, n_ctx=1024) as backend:
        backend.prefill([before, visual])
        state = backend.save_state()
        states.put(key("p1"), state)
        tokens.put(key("t1"), CachedPage(page, ReadNotices()))
        tokens.put(key("t2"), CachedPage(page, ReadNotices()))
        assert states.get(key("p1")) is not None  # a hit: p1 is now newer than t1 and t2
        assert present() == {"p1", "t1", "t2"}
        # Room for t2 and two states: the least recently used entry, the page of tokens t1, goes.
        budget.max_bytes = size("t2") + 2 * size("p1")
        states.put(key("p2"), state)
        assert present() == {"p1", "p2", "t2"}, "a prefix state's write did not evict the oldest page of tokens"
        assert tokens.get(key("t2")) is not None  # t2 is now the newest; p1 the oldest
        budget.max_bytes = size("t2") + size("p2") + size("t2")
        tokens.put(key("t3"), CachedPage(page, ReadNotices()))
        assert present() == {"p2", "t2", "t3"}, "a page of tokens' write did not evict the oldest prefix state"
        assert budget.used_bytes() <= budget.max_bytes
        # Both stores still answer for what they kept, and only for that.
        assert tokens.get(key("t1")) is None and tokens.get(key("t3")) is not None and states.get(key("p1")) is None
        assert states.get(key("p2")) is not None


def test_a_stored_state_llama_cpp_refuses_is_decoded_again(bundle, tmp_path, monkeypatch):
    """A state on disk that passes the store's checks but that llama.cpp will not restore (here,
    saved by a context without flash attention) is dropped and the prefix decoded again."""
    from fila_cli import Asker, AskOptions, ModelOptions
    from fila_cli.llm import LlamaSettings, StateRefusedError
    from tests.helpers.bad_documents import make_good_pdf

    monkeypatch.setenv("FILA_CACHE_DIR", str(tmp_path / "cache"))
    pdf = make_good_pdf(tmp_path / "invoice.pdf", ["Total due: 42.00 EUR."])
    options = AskOptions(sampling=SamplingParams(max_tokens=6))
    asker = Asker.from_options(ModelOptions(model=str(bundle), device="cpu", dtype="float32"))
    first = asker.ask(pdf, "What is the total due?", options)
    (stored,) = list((tmp_path / "cache").rglob("*.llstate"))
    stored_key = stored.name.removesuffix(".llstate")
    with LlamaBackend(bundle / LLM_FILE, n_ctx=asker.backend.n_ctx, settings=LlamaSettings(flash_attn=False)) as other:
        other.prefill([asker.template.render("What is the total due?")[0]])
        foreign = other.save_state()
    with pytest.raises(StateRefusedError):
        asker.backend.load_state(foreign)
    asker.prefix_store.put(stored_key, foreign)
    again = Asker.from_options(ModelOptions(model=str(bundle), device="cpu", dtype="float32")).ask(
        pdf, "What is the total due?", options)
    assert again.answer == first.answer and again.confidence == pytest.approx(first.confidence, abs=1e-6)
    assert asker.prefix_store.get(stored_key) is not None  # decoded again and stored again


def write_tiny_lora(path, *, rank: int = 4, seed: int = 1):
    """A LoRA adapter GGUF for the tiny LLM (q and v projections of each layer), large enough to move its answers."""
    from gguf import GGUFType, GGUFWriter, Keys

    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(rank))
    for layer in range(2):
        for projection in ("attn_q", "attn_v"):
            name = f"blk.{layer}.{projection}.weight"
            writer.add_tensor(f"{name}.lora_a", rng.normal(0, 0.5, (rank, TINY_LLM_WIDTH)).astype(np.float32))
            writer.add_tensor(f"{name}.lora_b", rng.normal(0, 0.5, (TINY_LLM_WIDTH, rank)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_bundle_adding_a_lora_to_the_same_llm_does_not_restore_the_base_models_state(bundle, tmp_path, monkeypatch):
    """Same LLM file, same page, same prompt; one bundle adds a LoRA adapter: its state is its own."""
    import shutil

    from fila_cli import Asker, AskOptions, ModelOptions
    from tests.helpers.bad_documents import make_good_pdf
    from tests.helpers.tiny_bundle import MMPROJ_FILE

    with_lora = tmp_path / "with-lora"
    with_lora.mkdir()
    for name in (LLM_FILE, MMPROJ_FILE):  # the very same files (same content identity) as the base bundle's
        shutil.copy(bundle / name, with_lora / name)
    write_tiny_lora(with_lora / "lora.gguf")
    (with_lora / "bundle.json").write_text(json.dumps(
        {"name": "tiny-lora", "files": {"llm": LLM_FILE, "vision": MMPROJ_FILE, "lora": "lora.gguf"}}))
    monkeypatch.setenv("FILA_CACHE_DIR", str(tmp_path / "cache"))
    pdf = make_good_pdf(tmp_path / "invoice.pdf", ["Total due: 42.00 EUR."])
    options = AskOptions(sampling=SamplingParams(max_tokens=6))

    def ask(model: str, use_cache: bool = True):
        asker = Asker.from_options(ModelOptions(model=model, device="cpu", dtype="float32", use_cache=use_cache))
        return asker.ask(pdf, "What is the total due?", options), asker.backend.stats.embedding_rows

    base, _ = ask(str(bundle))  # stores the base model's state after the page
    fresh, _ = ask(str(with_lora), use_cache=False)
    assert fresh.confidence != pytest.approx(base.confidence, abs=1e-6), "the adapter does not change the answer"
    cached, embedding_rows = ask(str(with_lora))
    assert embedding_rows > 0, "the LoRA bundle restored the base model's stored state"
    assert cached.answer == fresh.answer and cached.confidence == pytest.approx(fresh.confidence, abs=1e-6)
