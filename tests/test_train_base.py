"""fila train's --save-base, --fusion-lr and --cache-pages, and the batched encoder they train
through. Tiny models built at test time and trained for real; nothing mocked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fila_cli.train.base import BASE_DIR
from fila_cli.train.build import build_model
from fila_cli.train.chat import ChatRenderer
from fila_cli.train.config import TrainConfig
from fila_cli.train.loop import make_optimizer, train
from fila_cli.train.model import FUSION_GROUP, LLM_GROUP, PROJECTOR_GROUP
from fila_cli.train.prepare import load_sample_image, prepare_data, render_pages
from fila_cli.vision.anyres import preprocess
from tests.helpers.tiny_train import build_tiny_base, write_fusion_config, write_samples
from tests.helpers.tiny_vision import page_image


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_base")
    base = build_tiny_base(root / "base")
    data, images = write_samples(root, 8)
    return {"root": root, "base": base, "data": data, "images": images, "fusion": write_fusion_config(root / "fusion.json")}


def config_for(workspace, out: Path, **overrides) -> TrainConfig:
    settings = dict(stage=2, data=str(workspace["data"]), images=str(workspace["images"]), base=str(workspace["base"]),
                    out=str(out), fusion_config=str(workspace["fusion"]), batch_size=2, max_steps=2, full_llm=True,
                    export=False, lr=1e-3, gradient_checkpointing=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_fusion_lr_reaches_the_optimiser_groups(workspace, tmp_path):
    config = config_for(workspace, tmp_path / "run", lr=1e-3, llm_lr=3e-4, fusion_lr=1e-2)
    model, _ = build_model(config)
    lrs = {group["name"]: group["lr"] for group in make_optimizer(model, config).param_groups}
    assert lrs == {FUSION_GROUP: 1e-2, PROJECTOR_GROUP: 1e-3, LLM_GROUP: 3e-4}
    # Unset, CVFM trains at --lr, as before the option existed.
    default = config_for(workspace, tmp_path / "run", lr=1e-3)
    assert {g["name"]: g["lr"] for g in make_optimizer(model, default).param_groups}[FUSION_GROUP] == 1e-3


@pytest.mark.slow
def test_fusion_lr_reaches_the_cli(workspace, tmp_path):
    """fila train --fusion-lr: the optimiser of the run (its checkpoint's groups) has CVFM at that rate."""
    from typer.testing import CliRunner

    from fila_cli.cli.app import app
    from fila_cli.train.checkpoint import latest_checkpoint, read_state

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", "--stage", "1", "--data", str(workspace["data"]), "--images", str(workspace["images"]),
                                      "--base", str(workspace["base"]), "--out", str(out), "--fusion-config", str(workspace["fusion"]),
                                      "--lr", "0.001", "--fusion-lr", "0.02", "--max-steps", "1", "--batch-size", "2",
                                      "--no-gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    groups = {group["name"]: group["initial_lr"] for group in read_state(latest_checkpoint(out))["param_groups"]}
    assert groups == {FUSION_GROUP: 0.02, PROJECTOR_GROUP: 0.001}
    with pytest.raises(ValueError, match="fusion-lr"):
        config_for(workspace, tmp_path / "x", fusion=False, fusion_config=None, fusion_lr=1e-2)


@pytest.mark.slow
def test_a_saved_base_loads_as_llava_next_and_gives_the_same_tokens(workspace, tmp_path):
    """A base trained without fusion (the LLaVA-NeXT baseline) is written back as a checkpoint;
    built from it, a model computes the very logits of the model that wrote it."""
    out = tmp_path / "base-run"
    result = train(config_for(workspace, out, fusion=False, fusion_config=None, save_base=True))
    saved = out / BASE_DIR
    assert (saved / "config.json").is_file() and (saved / "tokenizer.json").is_file()
    # The same tensor names as the source checkpoint: it loads wherever the source does.
    with safe_open(str(workspace["base"] / "model.safetensors"), "pt") as source, safe_open(str(saved / "model.safetensors"), "pt") as copy:
        assert set(source.keys()) == set(copy.keys())
    # As transformers' own LLaVA-NeXT class reads it.
    from transformers import LlavaNextForConditionalGeneration

    LlavaNextForConditionalGeneration.from_pretrained(str(saved))
    again, tokenizer = build_model(config_for(workspace, tmp_path / "again", base=str(saved), fusion=False, fusion_config=None))
    trained = result.model.eval()
    again.eval()
    samples = prepare_data(workspace["data"], workspace["images"], ChatRenderer(tokenizer), again.vision, 4096, warn=print).samples[:3]
    images = [load_sample_image(s, again.vision) for s in samples]
    with torch.no_grad():
        inputs, _, mask = trained.batch(samples, images)
        inputs_again, _, mask_again = again.batch(samples, images)
        logits = trained.llm(inputs_embeds=inputs, attention_mask=mask).logits
        logits_again = again.llm(inputs_embeds=inputs_again, attention_mask=mask_again).logits
    torch.testing.assert_close(logits_again, logits, rtol=0, atol=1e-5)
    assert torch.equal(logits_again.argmax(-1), logits.argmax(-1))
    # Training moved what it trains: the saved base is not the source.
    before, _ = build_model(config_for(workspace, tmp_path / "before", fusion=False, fusion_config=None))
    assert not torch.equal(before.vision.projector.linear_1.weight, again.vision.projector.linear_1.weight)
    assert torch.equal(before.vision.vit.embeddings.patch_embedding.weight, again.vision.vit.embeddings.patch_embedding.weight)


@pytest.mark.slow
def test_arms_start_from_a_saved_base_with_fresh_fusion(workspace, tmp_path):
    """The benchmark's stage 2: a hybrid run whose --base is a saved base."""
    first = tmp_path / "first"
    train(config_for(workspace, first, fusion=False, fusion_config=None, save_base=True))
    result = train(config_for(workspace, tmp_path / "arm", base=str(first / BASE_DIR), fusion_lr=1e-2))
    assert result.model.vision.cvfm is not None and result.final_loss is not None


def test_batched_encoding_equals_page_by_page(workspace):
    config = config_for(workspace, workspace["root"] / "unused")
    torch.manual_seed(0)
    model, _ = build_model(config)
    encoder = model.vision.eval()
    for stage in encoder.cvfm.stages.values():  # open the gates, so fusion changes the tokens
        torch.nn.init.normal_(stage.residual.gate, std=1.0)
    # Two canvases (1x1, 1x2, 2x1): pages of one shape share a ConvNeXt batch, the others get their own.
    shapes = [(260, 260), (120, 300), (300, 120), (250, 260)]
    pages = [encoder.preprocess(page_image(h, w, seed=i)) for i, (h, w) in enumerate(shapes)]
    with torch.no_grad():
        one_by_one = [encoder(page) for page in pages]
        batched = encoder.forward_batch(pages)
    assert len({tuple(p.highres.pixels.shape) for p in pages}) > 1  # the samples' pages differ in shape: grouped batches
    for single, many in zip(one_by_one, batched):
        torch.testing.assert_close(many, single, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_cached_pages_are_the_preprocessed_pages_and_train_the_same(workspace, tmp_path):
    config = config_for(workspace, tmp_path / "plain")
    model, tokenizer = build_model(config)
    samples = prepare_data(workspace["data"], workspace["images"], ChatRenderer(tokenizer), model.vision, 4096, warn=print).samples
    cached = render_pages(samples, model.vision)
    for sample in samples:
        expected = preprocess(load_sample_image(sample, model.vision), model.vision.anyres, model.vision.highres_scale)
        page = cached[sample.index].normalized(model.vision.anyres)
        assert torch.equal(page.views, expected.views) and torch.equal(page.canvas, expected.canvas)
        assert torch.equal(page.highres.pixels, expected.highres.pixels) and page.highres.geometry == expected.highres.geometry
    plain = train(config)
    with_cache = train(config_for(workspace, tmp_path / "cached", cache_pages=True))
    assert with_cache.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    assert json.loads((tmp_path / "cached" / "train_config.json").read_text())["cache_pages"] is True
