"""Caches: a second question on a page does no rendering and no vision encoding (counted, not
timed); prefix reuse gives the same answers as decoding everything; `fila cache info|clear`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fila_cli.bundles.bundle import resolve_bundle
from fila_cli.caches.folder import CacheFolder
from fila_cli.cli.app import app
from fila_cli.documents.document import DEFAULT_MAX_PIXELS, Document
from fila_cli.llm import SamplingParams
from fila_cli.qa.ask import Asker, AskOptions
from fila_cli.vision.model.encoder import HybridEncoder
from fila_cli.vision.token_cache import TokenCache
from tests.helpers.bad_documents import make_good_pdf

OPTIONS = AskOptions(sampling=SamplingParams(max_tokens=6))


@pytest.fixture(scope="module")
def bundle(bundle):
    """The shared tiny bundle (conftest), resolved as the library takes it."""
    return resolve_bundle(str(bundle))


@pytest.fixture
def counted(monkeypatch):
    counts = {"render": 0, "encode": 0}
    render, encode = Document.render_page, HybridEncoder.encode

    def counting_render(self, *args, **kwargs):
        counts["render"] += 1
        return render(self, *args, **kwargs)

    def counting_encode(self, *args, **kwargs):
        counts["encode"] += 1
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(Document, "render_page", counting_render)
    monkeypatch.setattr(HybridEncoder, "encode", counting_encode)
    return counts


def test_second_question_on_a_cached_page_skips_render_and_encode(bundle, counted, tmp_path):
    pdf = make_good_pdf(tmp_path / "one.pdf", ["Total due: 42.00 EUR. Signed by Ada."])
    asker = Asker.load(bundle, device="cpu", dtype="float32", token_cache=TokenCache(CacheFolder(tmp_path / "cache")))
    first = asker.ask(pdf, "What is the total due?", OPTIONS)
    assert counted == {"render": 1, "encode": 1}
    second = asker.ask(pdf, "Who signed?", OPTIONS)
    assert counted == {"render": 1, "encode": 1}, "the cached page was rendered or encoded again"
    assert second.timings.render_s == 0 and second.timings.encode_s == 0
    assert second.tokens["visual"] == first.tokens["visual"]
    # Same answer from cached tokens as from fresh ones.
    fresh = Asker(asker.encoder, asker.backend, asker.template, bundle).ask(pdf, "Who signed?", OPTIONS)
    assert fresh.answer == second.answer and counted["encode"] == 2


def test_cache_key_separates_documents(bundle, counted, tmp_path):
    asker = Asker.load(bundle, device="cpu", dtype="float32", token_cache=TokenCache(CacheFolder(tmp_path / "cache")))
    for name in ("a", "b"):
        asker.ask(make_good_pdf(tmp_path / f"{name}.pdf", [f"Document {name}"]), "What is it?", OPTIONS)
    assert counted["encode"] == 2


def test_prefix_reuse_gives_the_same_answers(bundle, tmp_path):
    pdf = make_good_pdf(tmp_path / "one.pdf", ["Total due: 42.00 EUR. Signed by Ada."])
    plain = Asker.load(bundle, device="cpu", dtype="float32")
    reusing = Asker(plain.encoder, plain.backend, plain.template, bundle, token_cache=TokenCache(CacheFolder(tmp_path / "c")), reuse_prefix=True)
    questions = ["What is the total due?", "Who signed?", "What currency?"]
    expected = [plain.ask(pdf, q, OPTIONS).answer for q in questions]
    assert [reusing.ask(pdf, q, OPTIONS).answer for q in questions] == expected


def test_cache_info_and_clear(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("FILA_CACHE_DIR", str(tmp_path / "cli-cache"))
    asker = Asker.load(bundle, device="cpu", dtype="float32", token_cache=TokenCache())
    asker.ask(make_good_pdf(tmp_path / "x.pdf", ["Hello"]), "What is it?", OPTIONS)
    runner = CliRunner()
    info = runner.invoke(app, ["cache", "info"])
    assert info.exit_code == 0 and "1 pages" in info.stdout and str(tmp_path / "cli-cache") in info.stdout
    assert runner.invoke(app, ["cache", "clear"]).exit_code == 0
    assert "0 pages" in runner.invoke(app, ["cache", "info"]).stdout


def test_tokens_encoded_in_another_precision_are_not_served(bundle, counted, tmp_path):
    import torch

    from fila_cli.documents.document import open_document
    from fila_cli.documents.render import render_for_canvas
    from fila_cli.vision.token_cache import token_cache_key

    pdf = make_good_pdf(tmp_path / "one.pdf", ["Total due: 42.00 EUR. Signed by Ada."])
    cache = TokenCache(CacheFolder(tmp_path / "cache"))
    bf16 = Asker.load(bundle, device="cpu", dtype="bfloat16", token_cache=cache)
    bf16.ask(pdf, "What is the total due?", OPTIONS)
    assert counted["encode"] == 1 and bf16.encoder.dtype == torch.bfloat16
    fp32 = Asker(Asker.load(bundle, device="cpu", dtype="float32").encoder, bf16.backend, bf16.template, bundle, token_cache=cache)
    fp32.ask(pdf, "What is the total due?", OPTIONS)
    assert counted["encode"] == 2, "bfloat16 tokens were served to a float32 run"
    # The float32 run's cached tokens are a float32 encode's, not the bfloat16 ones.
    with open_document(pdf) as document:
        sha256, image = document.content_hash(), render_for_canvas(document, 0, fp32.encoder.anyres)
    fresh = fp32.encoder.encode(image).tokens
    cached = {dtype: cache.get(token_cache_key(sha256, 0, fp32.encoder.anyres, DEFAULT_MAX_PIXELS, *fp32.pages._weights_identity,
                                               dtype=dtype, device="cpu")).page.tokens for dtype in ("float32", "bfloat16")}
    assert torch.equal(cached["float32"], fresh)
    assert not torch.equal(cached["bfloat16"], fresh)


def test_cache_key_holds_dtype_device_and_the_highres_scale():
    """Each argument the product passes (``Asker.prepare_page``) changes the key."""
    from fractions import Fraction

    from fila_cli.config import AnyresConfig
    from fila_cli.vision.token_cache import token_cache_key

    base = ("0" * 64, 0, AnyresConfig(), DEFAULT_MAX_PIXELS, "vision-id", None)
    keys = {token_cache_key(*base, dtype="float32", device="cpu"), token_cache_key(*base, dtype="bfloat16", device="cpu"),
            token_cache_key(*base, dtype="float32", device="cuda"),
            token_cache_key(*base, dtype="float32", device="cpu", highres_scale=Fraction(2)),
            token_cache_key(*base, dtype="float32", device="cpu", highres_scale=Fraction(3, 2)),
            token_cache_key("1" * 64, *base[1:], dtype="float32", device="cpu"),
            token_cache_key(*base[:5], "fusion-id", dtype="float32", device="cpu")}
    assert len(keys) == 7


def test_a_damaged_page_of_tokens_is_recomputed_not_served(bundle, counted, tmp_path):
    """A flipped byte in the cached tokens, or in their metadata (geometry, notices): the entry is
    refused, deleted, the page encoded again and stored again."""
    pdf = make_good_pdf(tmp_path / "one.pdf", ["Total due: 42.00 EUR. Signed by Ada."])
    cache = TokenCache(CacheFolder(tmp_path / "cache"))
    asker = Asker.load(bundle, device="cpu", dtype="float32", token_cache=cache)
    first = asker.ask(pdf, "Who signed?", OPTIONS)
    (entry,) = cache.directory.glob("*/*.safetensors")
    good = entry.read_bytes()
    n_header = int.from_bytes(good[:8], "little")
    for position in (len(good) - 5, 8 + n_header - 20, good.index(b'"geometry"') + 15):  # tokens, metadata tail, geometry
        damaged = bytearray(good)
        damaged[position] ^= 0x01
        entry.write_bytes(bytes(damaged))
        encodes = counted["encode"]
        again = asker.ask(pdf, "Who signed?", OPTIONS)
        assert counted["encode"] == encodes + 1, f"a page with byte {position} flipped was served from the cache"
        assert again.answer == first.answer and again.tokens == first.tokens
        assert cache.get(entry.stem) is not None, "the recomputed page was not stored again"
