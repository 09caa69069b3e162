"""`fila ask` on one A4 page, end to end: where the user's wait goes, side by side in one run.

The model is what a user runs, with random weights (the cost does not depend on them): the
full-size vision side (CLIP ViT-L/14-336 mmproj, f16, fusion off, as the bundles ship today) and
the Mistral-7B-shaped Q4_K_M GGUF of ``llm_shapes.py`` (every layer, quantised by llama.cpp).
Columns: the CPU, and CUDA when this machine has a GPU (torch.cuda for the encoder, llama.cpp
offload for the LLM), else "n/a". Rows, each measured in a fresh process:

- start-up: from the process's spawn until the modules `fila ask` imports are loaded;
- model load: vision encoder and LLM (mmap of the GGUF);
- render, preprocess (anyres crops), encode (ViT + projector), LLM prefill (prompt, visual tokens,
  question), first token (from the start of the prefill), whole answer (16 tokens, from render to
  the last token), and the `fila ask` process's whole wall time (the real CLI, a separate run);
- `fila batch` pages/min over --batch-pages one-page documents (the real CLI, caches off);
- llama.cpp's own multimodal pipeline (mtmd: its CLIP encoder and its prefill) on the same page,
  the same mmproj and the same LLM, or "n/a" and why when it cannot run them.

``--small`` swaps the LLM for a tiny one (and a tiny vision tower), so the whole script runs in
seconds: tests/test_end_to_end_benchmark.py runs it that way.

Usage: python benchmarks/end_to_end.py [--small] [--batch-pages 20] [--max-tokens 16] [--skip cli batch mtmd]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))  # the checkout: fila_cli, tests.helpers

QUESTION = "What is the total due?"
A4_POINTS = (595, 842)
BODY_FONT_POINTS = 9
N_CTX = 4096
SMALL_LLM = dict(n_embd=256, n_layer=2, n_head=4, n_ff=512)
NOT_AVAILABLE = "n/a"
STAGES = ("start-up", "model load", "render", "preprocess", "encode", "LLM prefill", "first token", "whole answer")


# --- the model and the documents ------------------------------------------------------------------


def bundle_dir(small: bool) -> Path:
    """A bundle directory (LLM GGUF + mmproj GGUF), cached under the benchmarks' cache."""
    from llm_shapes import cache_dir, seven_b_gguf

    directory = cache_dir() / ("end-to-end-small" if small else "end-to-end-7b")
    directory.mkdir(parents=True, exist_ok=True)
    llm, mmproj = directory / "llm.gguf", directory / "mmproj.gguf"
    if small:
        from tests.helpers.tiny_bundle import write_tiny_mmproj
        from tests.helpers.tiny_llm import build_tiny_llm

        if not llm.exists():
            build_tiny_llm(llm, **SMALL_LLM, n_ctx_train=N_CTX)
        if not mmproj.exists():
            write_tiny_mmproj(mmproj, llm_width=SMALL_LLM["n_embd"])
        return directory
    if not llm.exists():
        llm.symlink_to(seven_b_gguf("Q4_K_M"))
    if not mmproj.exists():
        from caches import write_full_size_mmproj

        partial = directory / "mmproj.partial"
        write_full_size_mmproj(partial, 4096)
        partial.rename(mmproj)
    return directory


def a4_pdf(path: Path, label: str = "") -> Path:
    """One A4 page of dense 9-point invoice text (``label`` makes each document's pixels its own)."""
    import pymupdf

    document = pymupdf.open()
    page = document.new_page(width=A4_POINTS[0], height=A4_POINTS[1])
    line = f"Invoice 2024-117{label} total due 1,234.00 EUR payable within 30 days of receipt. " * 2
    for y in range(40, A4_POINTS[1] - 40, BODY_FONT_POINTS + 3):
        page.insert_text((36, y), line, fontsize=BODY_FONT_POINTS)
    document.save(path)
    return path


# --- one `fila ask`, stage by stage (a child process) --------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def ask_child(spawned_at: float, bundle: str, pdf: str, device: str, max_tokens: int) -> dict:
    """What `fila ask` does, timed stage by stage; ``spawned_at``: the parent's clock at spawn."""
    import fila_cli.cli.ask  # noqa: F401  (the modules `fila ask` imports before any work)

    startup = time.time() - spawned_at
    import torch

    from fila_cli.documents.document import open_document
    from fila_cli.documents.render import render_for_canvas
    from fila_cli.llm.sampling import SamplingParams
    from fila_cli.qa.ask import Asker
    from fila_cli.qa.options import ModelOptions

    timings = {"start-up": startup}
    started = time.perf_counter()
    asker = Asker.from_options(ModelOptions(model=bundle, device=device, use_cache=False,
                                            gpu_layers=None if device == "cuda" else 0))
    timings["model load"] = time.perf_counter() - started
    encoder = asker.encoder
    answer_started = time.perf_counter()
    with open_document(pdf) as document:
        image = render_for_canvas(document, 0, encoder.anyres, encoder.highres_scale)
    timings["render"] = time.perf_counter() - answer_started
    with torch.inference_mode():
        started = time.perf_counter()
        page = encoder.preprocess(image)
        timings["preprocess"] = time.perf_counter() - started
        started = time.perf_counter()
        visual = encoder.forward(page).float().cpu().numpy()
        _sync(device)
        timings["encode"] = time.perf_counter() - started
    before, after = asker.template.render(QUESTION)
    generation = asker.backend.generate([before, visual, after], SamplingParams(max_tokens=max_tokens))
    timings["LLM prefill"] = generation.prefill_s
    timings["first token"] = generation.prefill_s + generation.first_token_s  # from the start of the prefill
    timings["whole answer"] = time.perf_counter() - answer_started
    return {"timings": timings, "visual_tokens": len(visual), "generated": generation.n_generated}


def mtmd_child(bundle: str, pdf: str, device: str, max_tokens: int) -> dict:
    """The same page through llama.cpp's multimodal pipeline (mtmd): its CLIP and its prefill."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    from fila_cli.documents.document import open_document
    from fila_cli.documents.render import render_for_canvas
    from fila_cli.vision.load import load_vision_weights

    directory = Path(bundle)
    llm = llama_cpp.Llama(str(directory / "llm.gguf"), n_ctx=N_CTX, n_gpu_layers=-1 if device == "cuda" else 0,
                          n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = device == "cuda"
    params.n_threads = os.cpu_count() or 1
    params.print_timings = False
    context = mtmd.mtmd_init_from_file(str(directory / "mmproj.gguf").encode(), llm.model, params)
    if not context:
        return {"error": "mtmd_init_from_file refused the mmproj (llama.cpp's log: --verbose)"}
    weights = load_vision_weights(directory / "mmproj.gguf")
    from fila_cli.config import AnyresConfig

    anyres = AnyresConfig(crop_size=weights.clip_config.image_size, image_grid_pinpoints=weights.image_grid_pinpoints)
    with open_document(pdf) as document:
        image = render_for_canvas(document, 0, anyres, None).convert("RGB")
    pixels = image.tobytes()
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels))
    text = mtmd.mtmd_input_text()
    marker = mtmd.mtmd_default_marker().decode()  # where the image goes in mtmd's prompt
    prompt = f"[INST] {marker}\n{QUESTION} [/INST]".encode()
    text.text, text.text_len = prompt, len(prompt)
    text.add_special = True
    text.parse_special = True
    chunks = mtmd.mtmd_input_chunks_init()
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    started = time.perf_counter()
    rc = mtmd.mtmd_tokenize(context, chunks, ctypes.byref(text), bitmaps, 1)
    if rc != 0:
        return {"error": f"mtmd_tokenize returned {rc}"}
    n_tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
    new_n_past = llama_cpp.llama_pos(0)
    rc = mtmd.mtmd_helper_eval_chunks(context, llm.ctx, chunks, 0, 0, llm.n_batch, True, ctypes.byref(new_n_past))
    if rc != 0:
        return {"error": f"mtmd_helper_eval_chunks returned {rc}"}
    encode_prefill = time.perf_counter() - started
    # Greedy decoding of the answer, llama.cpp's batch API directly.
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    import numpy as np

    generated = 0
    for _ in range(max_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        token = int(np.argmax(logits))
        if generated == 0:
            first_token = time.perf_counter() - started
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        generated += 1
        llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(token), 1))
    return {"timings": {"encode + prefill": encode_prefill, "first token": first_token,
                        "whole answer": time.perf_counter() - started},
            "tokens": n_tokens, "generated": generated}


def run_child(kind: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    spawned_at = time.time()
    completed = subprocess.run([sys.executable, __file__, "--child", kind, str(spawned_at), *args],
                               capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {completed.returncode} (signal {-completed.returncode})"
                if completed.returncode < 0 else f"exit code {completed.returncode}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- the real CLI ----------------------------------------------------------------------------------


def fila(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "fila_cli", *args], capture_output=True, text=True, env=env,
                               check=False)
    return time.perf_counter() - started, completed


def cli_ask_wall(bundle: Path, pdf: Path, device: str, max_tokens: int) -> float | str:
    wall, completed = fila("ask", str(pdf), QUESTION, "--model", str(bundle), "--device", device, "--no-cache",
                           "--max-tokens", str(max_tokens), "--json",
                           *(["--gpu-layers", "0"] if device == "cpu" else []))
    return wall if completed.returncode == 0 else f"failed: {completed.stderr.strip().splitlines()[-1:]}"


def batch_pages_per_minute(bundle: Path, folder: Path, n_pages: int, device: str, max_tokens: int) -> float | str:
    output = folder.parent / f"batch-{device}.jsonl"
    wall, completed = fila("batch", str(folder), "--question", QUESTION, "--model", str(bundle), "--device", device,
                           "--no-cache", "--max-tokens", str(max_tokens), "--output", str(output),
                           *(["--gpu-layers", "0"] if device == "cpu" else []))
    if completed.returncode != 0:
        return f"failed: {completed.stderr.strip().splitlines()[-1:]}"
    return n_pages / wall * 60


# --- the table -------------------------------------------------------------------------------------


def cuda_reason() -> str | None:
    """None when this machine can run the CUDA column, else why not."""
    import llama_cpp
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if not llama_cpp.llama_supports_gpu_offload():
        return "llama.cpp built without GPU offload"
    return None


def cell(value: object, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny LLM and vision tower (checks the script)")
    parser.add_argument("--batch-pages", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[], choices=("cli", "batch", "mtmd"),
                        help="rows not to run (a 7B page takes minutes on a small CPU)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spawned_at, *rest = args.child
        if kind == "ask":
            bundle, pdf, device, max_tokens = rest
            print(json.dumps(ask_child(float(spawned_at), bundle, pdf, device, int(max_tokens))))
        else:
            bundle, pdf, device, max_tokens = rest
            print(json.dumps(mtmd_child(bundle, pdf, device, int(max_tokens))))
        return

    bundle = bundle_dir(args.small)
    no_cuda = cuda_reason()
    devices = ["cpu"] + ([] if no_cuda else ["cuda"])
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        pdf = a4_pdf(scratch / "page.pdf")
        folder = scratch / "batch"
        folder.mkdir()
        for index in range(args.batch_pages):
            a4_pdf(folder / f"doc-{index:02d}.pdf", label=f"-{index}")
        columns = {}
        for device in devices:
            skipped = {"error": "not run (--skip)"}
            columns[device] = {
                "ask": run_child("ask", str(bundle), str(pdf), device, str(args.max_tokens)),
                "mtmd": skipped if "mtmd" in args.skip else run_child("mtmd", str(bundle), str(pdf), device,
                                                                        str(args.max_tokens)),
                "cli": "not run (--skip)" if "cli" in args.skip else cli_ask_wall(bundle, pdf, device, args.max_tokens),
                "batch": "not run (--skip)" if "batch" in args.skip else batch_pages_per_minute(
                    bundle, folder, args.batch_pages, device, args.max_tokens),
            }
            print(f"{device}: {json.dumps(columns[device])}", file=sys.stderr, flush=True)
    print_table(columns, args, no_cuda)


def print_table(columns: dict, args: argparse.Namespace, no_cuda: str | None) -> None:
    cpu = columns["cpu"]
    llm = "tiny LLM (--small)" if args.small else "Mistral-7B-shaped Q4_K_M"
    ask = cpu["ask"]
    print(f"`fila ask` on one A4 page ({ask.get('visual_tokens', '?')} visual tokens), {llm}, ViT-L/14-336 mmproj "
          f"{'(tiny)' if args.small else 'f16'}, fusion off, random weights; {args.max_tokens}-token answer; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    cuda_header = "CUDA" if "cuda" in columns else f"CUDA ({no_cuda})"
    print(f"{'seconds':<34} {'CPU':>12} {cuda_header:>12}")

    def row(name: str, value_of) -> None:
        cuda = value_of(columns["cuda"]) if "cuda" in columns else NOT_AVAILABLE
        print(f"{name:<34} {cell(value_of(cpu)):>12} {cell(cuda):>12}")

    for stage in STAGES:
        row(f"fila: {stage}", lambda column, stage=stage: column["ask"]["timings"][stage]
            if "timings" in column["ask"] else column["ask"]["error"])
    row("fila ask: process wall time", lambda column: column["cli"])
    row(f"fila batch: pages/min ({args.batch_pages} pages)", lambda column: column["batch"])
    for stage in ("encode + prefill", "first token", "whole answer"):
        row(f"mtmd: {stage}", lambda column, stage=stage: column["mtmd"]["timings"][stage]
            if "timings" in column["mtmd"] else f"{NOT_AVAILABLE}: {column['mtmd']['error']}")
    if "tokens" in cpu["mtmd"]:
        print(f"(mtmd made {cpu['mtmd']['tokens']} prompt positions of the page and the question)")


if __name__ == "__main__":
    main()
