"""fila train: data, masking, stage 1, export to a bundle, resume. Tiny models built at test time,
trained for real (transformers LLM, fila's Hybrid Encoder, timm ConvNeXt), nothing mocked."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fila_cli.train.build import build_model
from fila_cli.train.chat import IGNORE_INDEX, ChatRenderer
from fila_cli.train.checkpoint import TRAINABLE_FILE, latest_checkpoint
from fila_cli.train.config import TrainConfig
from fila_cli.train.data import parse_conversation
from fila_cli.train.loop import lr_factor, train
from fila_cli.train.model import group_of
from fila_cli.train.prepare import load_sample_image, prepare_data
from tests.helpers.run_fila import fila, invoke
from tests.helpers.tiny_train import (
    CHATML_TEMPLATE,
    MISTRAL_TEMPLATE,
    build_tiny_base,
    char_tokenizer,
    write_fusion_config,
    write_samples,
)

TWO_TURNS = {"id": "two", "image": "p.png", "conversations": [
    {"from": "human", "value": "<image>\nwhat is the total?"}, {"from": "gpt", "value": "12 EUR"},
    {"from": "human", "value": "and the date?"}, {"from": "gpt", "value": "May 3"}]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = build_tiny_base(root / "base")
    data, images = write_samples(root, 16)
    return {"root": root, "base": base, "data": data, "images": images, "fusion": write_fusion_config(root / "fusion.json")}


def config_for(workspace, out: Path, **overrides) -> TrainConfig:
    settings = dict(stage=1, data=str(workspace["data"]), images=str(workspace["images"]), base=str(workspace["base"]),
                    out=str(out), fusion_config=str(workspace["fusion"]), batch_size=2, grad_accum=2, save_every=2)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("template", [MISTRAL_TEMPLATE, CHATML_TEMPLATE], ids=["mistral", "chatml"])
def test_labels_are_exactly_the_answer_tokens(template, tmp_path):
    tokenizer = char_tokenizer(template)
    renderer = ChatRenderer(tokenizer)
    tokens = renderer.tokenize(parse_conversation(TWO_TURNS, 0, tmp_path))
    labelled = [t for t in tokens.before_labels + tokens.after_labels if t != IGNORE_INDEX]
    end_of_turn = "</s>" if template == MISTRAL_TEMPLATE else "<|im_end|>\n"
    assert tokenizer.decode(labelled) == f"12 EUR{end_of_turn}May 3{end_of_turn}"
    # Labels are the input ids where they are not masked, and the image splits the text where <image> was.
    for ids, labels in ((tokens.before_ids, tokens.before_labels), (tokens.after_ids, tokens.after_labels)):
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    assert tokenizer.decode(tokens.before_ids).endswith("user\n" if template == CHATML_TEMPLATE else "[INST] ")
    assert tokenizer.decode(tokens.after_ids).startswith("\nwhat is the total?")


def test_bad_samples_are_skipped_and_counted(workspace, tmp_path):
    good = json.loads(workspace["data"].read_text())[0]
    records = [good, {**good, "id": "missing", "image": "nowhere.png"},
               {**good, "id": "no-image", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]},
               {**good, "id": "long", "conversations": [good["conversations"][0], {"from": "gpt", "value": "x" * 400}]},
               {**good, "id": "pdf-page", "image": "page0.png#page=2"}, "not an object"]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n{torn")
    model, tokenizer = build_model(config_for(workspace, tmp_path / "run"))
    warnings: list[str] = []
    prepared = prepare_data(data, workspace["images"], ChatRenderer(tokenizer), model.vision, 300, warn=warnings.append)
    assert [s.conversation.sample_id for s in prepared.samples] == [good["id"]]
    assert prepared.n_skipped == 6 and len(warnings) == 6
    assert all("\n" not in w for w in warnings)
    assert any("missing" in w and "nowhere.png" in w for w in warnings)
    assert any("long" in w and "--max-length 300" in w for w in warnings)


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(step, 100, 3) for step in range(100)]
    assert factors[:3] == [1 / 3, 2 / 3, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[2:]))
    assert factors[-1] < 1e-3


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def stage1_run(workspace):
    """Stage 1: 16 samples, global batch 4 (2 x 2 accumulated), 3 epochs = 12 steps. Returns
    (run dir, result, checksums of every tensor of the model as built before training)."""
    from tests.helpers.tiny_llm import build_tiny_llm

    out = workspace["root"] / "run1"
    llm_gguf = build_tiny_llm(workspace["root"] / "tiny-llm.gguf", n_embd=64)
    config = config_for(workspace, out, epochs=3, save_every=6, llm_gguf=str(llm_gguf))
    torch.manual_seed(config.seed)  # as train() does before building: the same random ConvNeXt
    fresh, _ = build_model(config)
    before = {name: _digest(tensor) for name, tensor in fresh.state_dict().items()}
    return out, train(config), before


@pytest.mark.slow
def test_stage1_loss_falls_and_only_fusion_and_projector_change(stage1_run):
    out, result, before = stage1_run
    assert result.steps == 12 and result.skipped == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert (out / "loss.png").stat().st_size > 0
    after = {name: _digest(tensor) for name, tensor in result.model.state_dict().items()}
    assert after.keys() == before.keys()
    changed = {name for name in before if after[name] != before[name]}
    assert {group_of(name) for name in changed} == {"cvfm", "projector"}
    assert any(name.startswith("vision.cvfm.") and "mlp" in name for name in changed)  # not only the gates
    unchanged_groups = {group_of(name) or "frozen" for name in before if name not in changed}
    assert {"vit", "llm", "convnext"} <= unchanged_groups  # ViT, LLM and ConvNeXt all kept
    # The checkpoint holds exactly the trainable tensors.
    trained = load_file(str(latest_checkpoint(out) / TRAINABLE_FILE))
    assert {group_of(name) for name in trained} == {"cvfm", "projector"}


@pytest.mark.slow
def test_training_tokens_equal_fila_encode(workspace, stage1_run, tmp_path):
    out, _, _ = stage1_run
    model, tokenizer = build_model(config_for(workspace, tmp_path / "again", init=str(out)))
    prepared = prepare_data(workspace["data"], workspace["images"], ChatRenderer(tokenizer), model.vision, 4096, warn=print)
    sample = prepared.samples[1]
    with torch.no_grad():
        embeddings, labels = model.sequence(sample, load_sample_image(sample, model.vision))
    n_before = len(sample.tokens.before_ids)
    training_tokens = embeddings[n_before : n_before + sample.n_visual]
    encoded = tmp_path / "tokens.safetensors"
    result = fila("encode", str(sample.conversation.image.path), "--mmproj", str(workspace["base"]),
                  "--fusion", str(out / "fusion.safetensors"), "--dtype", "float32", "-o", str(encoded))
    assert result.returncode == 0, result.stderr
    reference = load_file(str(encoded))["visual_tokens"]
    assert reference.shape == training_tokens.shape
    torch.testing.assert_close(training_tokens, reference, rtol=1e-5, atol=1e-6)
    assert (labels[n_before : n_before + sample.n_visual] == IGNORE_INDEX).all()


@pytest.mark.slow
def test_fila_ask_runs_the_exported_run(workspace, stage1_run):
    out, _, _ = stage1_run
    info = fila("weights", "info", str(out))
    assert info.returncode == 0, info.stderr
    assert "fusion" in info.stdout.lower()
    image = workspace["images"] / "page0.png"
    answer = fila("ask", str(image), "what is it?", "--model", str(out), "--json", "--max-tokens", "4", "--no-cache")
    assert answer.returncode == 0, answer.stderr
    record = json.loads(answer.stdout)
    assert record["model"] == out.name and record["tokens"]["visual"] > 0


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(workspace, tmp_path):
    whole = train(config_for(workspace, tmp_path / "whole", max_steps=4))
    assert whole.steps == 4
    # The interrupted run goes through the CLI: 2 steps of the 4-step schedule, then --resume.
    split = tmp_path / "split"
    first = fila("train", "--stage", "1", "--data", str(workspace["data"]), "--images", str(workspace["images"]),
                 "--base", str(workspace["base"]), "--out", str(split), "--fusion-config", str(workspace["fusion"]),
                 "--batch-size", "2", "--grad-accum", "2", "--save-every", "2", "--max-steps", "4", "--stop-after", "2")
    assert first.returncode == 0, first.stderr
    assert latest_checkpoint(split).name == "step-0000002"
    second = fila("train", "--out", str(split), "--resume", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["steps"] == 4
    expected = load_file(str(latest_checkpoint(tmp_path / "whole") / TRAINABLE_FILE))
    resumed = load_file(str(latest_checkpoint(split) / TRAINABLE_FILE))
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_dry_run_prints_groups_without_training(workspace, tmp_path):
    result = fila("train", "--stage", "1", "--data", str(workspace["data"]), "--images", str(workspace["images"]),
                  "--base", str(workspace["base"]), "--out", str(tmp_path / "dry"), "--fusion-config", str(workspace["fusion"]),
                  "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["trainable_parameters"]) == {"cvfm", "projector"}
    assert report["memory_estimate_bytes"] > 0
    assert not (tmp_path / "dry").exists()


def test_missing_options_are_a_usage_error(tmp_path):
    result = invoke("train", "--stage", "1", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fila: error: missing --data, --images, --base")


ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "examples" / "accelerate"
# Two processes on CPU: one thread each, so that the two share the machine's cores without oversubscribing.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # The shipped DDP config, unchanged but for the process count and fp32 (CPU autocast is slow and lossy).
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"),
                   "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"],
}


def ddp_options(workspace) -> list[str]:
    return ["--stage", "1", "--data", str(workspace["data"]), "--images", str(workspace["images"]),
            "--base", str(workspace["base"]), "--fusion-config", str(workspace["fusion"]), "--grad-accum", "2",
            "--max-steps", "2", "--device", "cpu", "--json"]


@pytest.fixture(scope="module")
def one_process_run(workspace):
    """The reference of the data-parallel tests: one process, 2 samples x 2 accumulated per step."""
    out = workspace["root"] / "one-process"
    single = fila("train", *ddp_options(workspace), "--batch-size", "2", "--out", str(out))
    assert single.returncode == 0, single.stderr
    assert json.loads(single.stdout)["processes"] == 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(launcher, workspace, one_process_run, tmp_path):
    """torchrun --nproc_per_node 2 / accelerate launch --num_processes 2 (gloo, CPU), 1 sample per
    process x 2 accumulated, against one process with 2 samples x 2 accumulated: the same 4 samples
    per step, the same weights and optimiser state."""
    ddp = subprocess.run([*LAUNCHERS[launcher], "-m", "fila_cli", "train", *ddp_options(workspace), "--batch-size", "1",
                          "--out", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summaries = [json.loads(line) for line in ddp.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # one summary per run, from the first process
    assert summaries[0]["processes"] == 2 and summaries[0]["parallelism"] == "MULTI_CPU"
    for file in (TRAINABLE_FILE, "optimizer.safetensors"):
        from_ddp = load_file(str(latest_checkpoint(tmp_path / "ddp") / file))
        from_one = load_file(str(latest_checkpoint(one_process_run) / file))
        assert from_ddp.keys() == from_one.keys()
        for name in from_one:
            torch.testing.assert_close(from_ddp[name], from_one[name], rtol=1e-4, atol=1e-6)
    from_one = load_file(str(latest_checkpoint(one_process_run) / TRAINABLE_FILE))
    base, _ = build_model(config_for(workspace, tmp_path / "fresh"))
    moved = sum(not torch.equal(from_one[name], base.state_dict()[name]) for name in from_one if "projector" in name)
    assert moved > 0  # the comparison is between trained weights, not two copies of the start


@pytest.mark.slow
def test_resume_under_accelerate_launch_reproduces_the_uninterrupted_run(workspace, one_process_run, tmp_path):
    """accelerate launch, 2 processes: 1 step of the 2-step schedule, stop, --resume under the same
    launcher: the final weights and AdamW state are the uninterrupted one-process run's."""
    out = tmp_path / "split"
    first = subprocess.run([*LAUNCHERS["accelerate"], "-m", "fila_cli", "train", *ddp_options(workspace), "--batch-size", "1",
                            "--save-every", "1", "--stop-after", "1", "--out", str(out)],
                           capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert first.returncode == 0, first.stderr[-3000:]
    assert latest_checkpoint(out).name == "step-0000001"
    second = subprocess.run([*LAUNCHERS["accelerate"], "-m", "fila_cli", "train", "--out", str(out), "--resume", "--json"],
                            capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert second.returncode == 0, second.stderr[-3000:]
    assert latest_checkpoint(out).name == "step-0000002"
    for file in (TRAINABLE_FILE, "optimizer.safetensors"):
        resumed = load_file(str(latest_checkpoint(out) / file))
        expected = load_file(str(latest_checkpoint(one_process_run) / file))
        assert resumed.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(resumed[name], expected[name], rtol=1e-4, atol=1e-6)


def test_an_fsdp_config_on_cpu_is_refused_not_run_unsharded(workspace, tmp_path):
    """accelerate runs FSDP on GPUs only: on CPU the shipped FSDP config must fail loudly (one line,
    exit 2), not fall back to plain data parallelism."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "fsdp.yaml"),
              "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]
    result = subprocess.run([*launch, "-m", "fila_cli", "train", *ddp_options(workspace), "--batch-size", "1",
                             "--out", str(tmp_path / "fsdp")], capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fila: error:")]
    assert errors and "FSDP" in errors[0] and "ddp.yaml" in errors[0]
    assert "Traceback (most recent call last)" not in result.stderr.split("fila: error:")[0]
    assert not (tmp_path / "fsdp" / "checkpoints").exists()


def test_a_deepspeed_config_is_refused(workspace, tmp_path):
    """What `accelerate launch` sets for a DeepSpeed config: fila train does not drive DeepSpeed and says so."""
    result = subprocess.run([sys.executable, "-m", "fila_cli", "train", *ddp_options(workspace), "--out", str(tmp_path / "ds")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_DEEPSPEED": "true"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fila: error: the accelerate config asks for DeepSpeed")
    assert not (tmp_path / "ds").exists()


@pytest.mark.slow
def test_fila_train_export_redoes_the_export_from_a_checkpoint(stage1_run):
    out, _, _ = stage1_run
    exported = load_file(str(out / "fusion.safetensors"))
    (out / "fusion.safetensors").unlink()
    (out / "bundle.json").unlink()
    result = fila("train", "export", str(out))
    assert result.returncode == 0, result.stderr
    again = load_file(str(out / "fusion.safetensors"))
    assert exported.keys() == again.keys()
    assert all(torch.equal(exported[name], again[name]) for name in exported)
    assert json.loads((out / "bundle.json").read_text())["files"]["fusion"] == "fusion.safetensors"


def test_a_pdf_page_is_read_as_inference_renders_it(workspace, tmp_path):
    import pymupdf

    from fila_cli.vision.encode import render_page

    pdf = pymupdf.open()
    pdf.new_page(width=595, height=842)  # A4 portrait
    pdf.new_page(width=842, height=595)  # A4 landscape
    pdf.save(tmp_path / "doc.pdf")
    sample = {"id": "pdf", "image": "doc.pdf#page=2",
              "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "yes"}]}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([sample]))
    model, tokenizer = build_model(config_for(workspace, tmp_path / "run"))
    prepared = prepare_data(data, tmp_path, ChatRenderer(tokenizer), model.vision, 4096, warn=print)
    (only,) = prepared.samples
    assert only.conversation.image.page == 2
    image = load_sample_image(only, model.vision)
    assert image.width > image.height  # page 2, the landscape one
    assert image.size == render_page(tmp_path / "doc.pdf", 2, model.vision.anyres, model.vision.highres_scale).size
    with torch.no_grad():
        embeddings, labels = model.sequence(only, image)
    assert embeddings.shape[0] == only.length == labels.shape[0]


@pytest.mark.slow
def test_fsdp_checkpoints_hold_full_tensors_and_restore_exactly(workspace, tmp_path):
    """Under torch's FSDP (2 CPU processes, gloo; accelerate selects FSDP on GPUs only), the
    checkpoint holds every trainable tensor whole, by the unsharded model's names; restoring it into
    a fresh sharded model and optimiser gives it back bit for bit; and the sharded step equals the
    unsharded step on the same two samples."""
    run = tmp_path / "fsdp"
    worker = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "helpers" / "fsdp_checkpoint_worker.py"), str(workspace["root"]), str(run)],
                            capture_output=True, text=True, timeout=600, env=ONE_THREAD, cwd=ROOT)
    assert worker.returncode == 0, worker.stderr[-3000:]
    model, _ = build_model(config_for(workspace, tmp_path / "shapes", stage=2, lora_r=4, lora_alpha=8.0))
    shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    sharded, restored, reference = (run / "checkpoints" / "step-0000001", run / "checkpoints" / "step-0000002",
                                    run / "reference" / "checkpoints" / "step-0000001")
    for file in (TRAINABLE_FILE, "optimizer.safetensors"):
        saved = load_file(str(sharded / file))
        again = load_file(str(restored / file))
        expected = load_file(str(reference / file))
        assert saved.keys() == again.keys() == expected.keys()
        for name in saved:
            assert torch.equal(saved[name], again[name]), name
            torch.testing.assert_close(saved[name], expected[name], rtol=1e-4, atol=1e-6)
    weights = load_file(str(sharded / TRAINABLE_FILE))
    assert {name: w.shape for name, w in weights.items()} == shapes
    assert any("lora_B" in name and weights[name].abs().sum() > 0 for name in weights)  # the step moved the LoRA


@pytest.mark.slow
@pytest.mark.parametrize("fusion", [False, True], ids=["anyres-only", "hybrid"])
def test_from_scratch_options_train_the_vit_and_the_anyres_only_baseline(workspace, tmp_path, fusion):
    """train_vit, fusion=False, export=False (benchmarks/fragmentation.py): the ViT trains with the
    rest, an anyres-only run has no ConvNeXt or CVFM at all, and no bundle is written."""
    out = tmp_path / "run"
    config = config_for(workspace, out, stage=2, fusion=fusion, fusion_config=str(workspace["fusion"]) if fusion else None,
                        train_vit=True, train_convnext=fusion, full_llm=True, export=False, lr=1e-3, max_steps=2, grad_accum=1)
    torch.manual_seed(config.seed)
    fresh, _ = build_model(config)
    before = {name: _digest(tensor) for name, tensor in fresh.state_dict().items()}
    result = train(config)
    assert (result.model.vision.convnext is None) is (not fusion) and (result.model.vision.cvfm is None) is (not fusion)
    after = {name: _digest(tensor) for name, tensor in result.model.state_dict().items()}
    assert after.keys() == before.keys()
    changed = {group_of(name) for name in before if after[name] != before[name]}
    assert changed == ({"vit", "projector", "llm", "cvfm", "convnext"} if fusion else {"vit", "projector", "llm"})
    assert latest_checkpoint(out) is not None
    assert not (out / "bundle.json").exists() and not (out / "fusion.safetensors").exists()
    # Such a run cannot become a bundle later either: one line, the usage exit code.
    exported = fila("train", "export", str(out))
    assert exported.returncode == 2 and "export=False" in exported.stderr and "Traceback" not in exported.stderr


@pytest.mark.parametrize("settings,message", [
    (dict(train_vit=True), "train_vit needs export=False"),
    (dict(fusion=False, fusion_config=None), "fusion=False needs export=False"),
    (dict(fusion=False, export=False), "takes no fusion config"),
])
def test_from_scratch_options_that_cannot_work_are_refused(workspace, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        config_for(workspace, tmp_path / "run", **settings)
