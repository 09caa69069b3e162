"""Stage 2 with LoRA: the GGUF adapter fila writes, applied by llama.cpp on the base GGUF, gives the
logits HF + peft give, for a llama (q/k rows permuted) and a qwen2 (not permuted) language model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fila_cli.llm.backend import LlamaBackend
from fila_cli.train.chat import ChatRenderer
from fila_cli.train.config import TrainConfig
from fila_cli.train.gguf_export import ADAPTER_FILE, write_lora_adapter
from fila_cli.train.loop import train
from fila_cli.train.prepare import load_sample_image, prepare_data
from tests.helpers.tiny_train import build_tiny_base, write_base_gguf, write_fusion_config, write_samples

pytestmark = pytest.mark.slow  # both tests train (stage 2, LoRA and full LLM)

# Both sides run float32; the difference is summation order (measured ~1e-5).
LOGITS_TOLERANCE = 1e-2
N_CTX = 1024


def last_logits_llama_cpp(gguf, embeddings: torch.Tensor, lora=None) -> np.ndarray:
    backend = LlamaBackend(gguf, n_ctx=N_CTX, n_gpu_layers=0, lora_path=lora)
    try:
        backend.prefill([embeddings.numpy()])
        return backend.last_logits()
    finally:
        backend.close()


def last_logits_hf(llm, embeddings: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return llm(inputs_embeds=embeddings[None], use_cache=False).logits[0, -1].float().numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_lora_adapter_matches_hf_peft(arch, tmp_path):
    base = build_tiny_base(tmp_path / "base", arch=arch)
    data, images = write_samples(tmp_path, 8)
    gguf = write_base_gguf(tmp_path / "base.gguf", base)
    out = tmp_path / "run2"
    config = TrainConfig(stage=2, data=str(data), images=str(images), base=str(base), out=str(out),
                         fusion_config=str(write_fusion_config(tmp_path / "fusion.json")), llm_gguf=str(gguf),
                         lora_r=4, lora_alpha=8.0, lr=1e-2, batch_size=2, max_steps=2, save_every=2)
    result = train(config)
    model = result.model.eval()
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"vision", "llm"}
    assert all("lora_" in n for n, p in model.llm.named_parameters() if p.requires_grad)
    prepared = prepare_data(data, images, ChatRenderer(__import__("fila_cli.train.base", fromlist=["x"]).load_tokenizer(base)),
                            model.vision, 4096, warn=print)
    sample = prepared.samples[0]
    with torch.no_grad():
        embeddings, _ = model.sequence(sample, load_sample_image(sample, model.vision))

    # The base GGUF is the HF model (the q/k permutation of the writer is right).
    with model.llm.disable_adapter():
        base_hf = last_logits_hf(model.llm, embeddings)
    base_cpp = last_logits_llama_cpp(gguf, embeddings)
    np.testing.assert_allclose(base_cpp, base_hf, atol=LOGITS_TOLERANCE, rtol=0)

    # The trained adapter, as exported by the run.
    adapter = out / ADAPTER_FILE
    trained_cpp = last_logits_llama_cpp(gguf, embeddings, lora=adapter)
    np.testing.assert_allclose(trained_cpp, last_logits_hf(model.llm, embeddings), atol=LOGITS_TOLERANCE, rtol=0)
    assert np.abs(trained_cpp - base_cpp).max() > 1e-4  # the adapter is applied

    # A large random adapter: any row order mistake in lora_b would show far above the tolerance.
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    random_adapter = write_lora_adapter(tmp_path / "random-lora.gguf", model.llm, model.llm.config)
    random_hf = last_logits_hf(model.llm, embeddings)
    random_cpp = last_logits_llama_cpp(gguf, embeddings, lora=random_adapter)
    # A context grown after loading (a new llama.cpp context on the same weights) keeps the adapter.
    with LlamaBackend(gguf, n_ctx=256, n_gpu_layers=0, lora_path=random_adapter) as grown:
        assert grown.ensure_context(N_CTX + 256) and grown.n_ctx >= N_CTX + 256
        grown.prefill([embeddings.numpy()])
        np.testing.assert_allclose(grown.last_logits(), random_cpp, atol=1e-4, rtol=0)
    assert np.abs(random_hf - base_hf).max() > 50 * LOGITS_TOLERANCE
    np.testing.assert_allclose(random_cpp, random_hf, atol=LOGITS_TOLERANCE, rtol=0)

    if arch == "llama":
        # fila ask loads the run's bundle: base GGUF + adapter + fusion weights.
        bundle = json.loads((out / "bundle.json").read_text())
        assert bundle["files"]["lora"] == ADAPTER_FILE
        ask = subprocess.run([sys.executable, "-m", "fila_cli", "ask", str(images / "page0.png"), "what is it?",
                              "--model", str(out), "--json", "--max-tokens", "3", "--no-cache"],
                             capture_output=True, text=True, timeout=600)
        assert ask.returncode == 0, ask.stderr
        assert json.loads(ask.stdout)["model"] == out.name


LOGITS_PROGRAM = """
import json, sys, numpy as np, torch
from safetensors.torch import load_file
from fila_cli.llm.backend import LlamaBackend
embeddings = load_file(sys.argv[2])["embeddings"]
backend = LlamaBackend(sys.argv[1], n_ctx=1024, n_gpu_layers=0)
backend.prefill([embeddings.numpy()])
print(json.dumps(backend.last_logits().tolist()))
"""


def logits_in_subprocess(gguf, embeddings: torch.Tensor, tmp_path) -> np.ndarray:
    """llama.cpp in a child process: a crash in a quantised kernel fails the test, not the run."""
    from safetensors.torch import save_file

    inputs = tmp_path / "embeddings.safetensors"
    save_file({"embeddings": embeddings.contiguous()}, str(inputs))
    done = subprocess.run([sys.executable, "-c", LOGITS_PROGRAM, str(gguf), str(inputs)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.array(json.loads(done.stdout))


def test_full_llm_export_quantised_q8_0(tmp_path):
    from fila_cli.train.base import load_tokenizer
    from fila_cli.train.gguf_export import FULL_LLM_F16_FILE, full_llm_file

    base = build_tiny_base(tmp_path / "base", arch="llama")
    data, images = write_samples(tmp_path, 8)
    gguf = write_base_gguf(tmp_path / "base.gguf", base)
    out = tmp_path / "full"
    config = TrainConfig(stage=2, data=str(data), images=str(images), base=str(base), out=str(out),
                         fusion_config=str(write_fusion_config(tmp_path / "fusion.json")), llm_gguf=str(gguf),
                         full_llm=True, quantization="Q8_0", lr=1e-3, batch_size=2, max_steps=2, save_every=2)
    model = train(config).model.eval()
    assert all(p.requires_grad for p in model.llm.parameters())  # the whole LLM trained
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["files"]["llm"] == full_llm_file("Q8_0") and "lora" not in bundle["files"]
    prepared = prepare_data(data, images, ChatRenderer(load_tokenizer(base)), model.vision, 4096, warn=print)
    sample = prepared.samples[0]
    with torch.no_grad():
        embeddings, _ = model.sequence(sample, load_sample_image(sample, model.vision))
    expected = last_logits_hf(model.llm, embeddings)
    assert np.abs(expected - last_logits_hf(__import__("fila_cli.train.base", fromlist=["x"]).load_llm(base), embeddings)).max() > 1e-3
    f16 = logits_in_subprocess(out / FULL_LLM_F16_FILE, embeddings, tmp_path)
    q8 = logits_in_subprocess(out / full_llm_file("Q8_0"), embeddings, tmp_path)
    # Relative to the largest logit: f16 weights measured 4.6e-4, Q8_0 (blocks of 32, one f16 scale each) 1.1e-2.
    scale = np.abs(expected).max()
    assert np.abs(f16 - expected).max() <= 1e-2 * scale
    assert np.abs(q8 - expected).max() <= 5e-2 * scale
    assert (out / full_llm_file("Q8_0")).stat().st_size < (out / FULL_LLM_F16_FILE).stat().st_size
