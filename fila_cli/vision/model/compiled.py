"""``torch.compile`` for inference: the encoder's heavy parts compiled once, reused page after page.

What is compiled are the units the model already runs as wholes: the ViT's layers between two
fusion points (``CLIPTower.run_layers``; all of them with fusion off), the projector, and the
ConvNeXt's stages (``ConvNeXtBranch.stage_maps``). The per-page glue stays eager: preprocessing,
the CVFM hook (a new closure over each page's ConvNeXt maps), alignment and packing.

Inductor's ``freezing`` turns the weights into constants, which is what lets it hand the linear
layers to oneDNN with prepacked weights and the bias and activation fused (CPU), or capture them
(GPU). The price is compilation when a new input shape arrives: a page's number of views and, with
fusion on, its high-resolution canvas differ between the five canvas shapes, so up to five graphs per
unit. ``benchmarks/encoder.py --compile`` measures both sides. Inference only: frozen weights do not
train, and a model moved or cast after compiling must be compiled again.
"""

from __future__ import annotations

import logging

import torch

from fila_cli.vision.model.encoder import HybridEncoder

# On a GPU the graphs are also captured as CUDA graphs: one launch per unit instead of one per kernel.
# (Not yet measured on a GPU: the lent H100 was not available when this was written.)
CUDA_OPTIONS = {"triton.cudagraphs": True}
# Five canvas shapes x the fusion points, with room: past this, dynamo falls back to eager rather than recompile.
RECOMPILE_LIMIT = 16


def compile_for_inference(encoder: HybridEncoder) -> HybridEncoder:
    """Compile ``encoder`` in place for ``encode`` (inference mode); returns it."""
    import torch._dynamo as dynamo  # torch.compile's front end: loaded only when asked for (seconds of start-up)

    encoder.eval()
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # Inductor's C++ toolchain probe says, on every CPU-only machine, that it found no CUDA runtime.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # Freezing must be inductor's process-wide setting: passed in torch.compile's options it did not
    # take effect (measured: no gain over eager; set here, 10-17 % on ViT-L layers on the 2-core CPU).
    # It only changes graphs compiled without autograd, i.e. for inference.
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    options = CUDA_OPTIONS if encoder.device.type == "cuda" else None

    def compiled(fn):
        # dynamic=False: one specialised graph per input shape, as freezing's weight packing wants.
        return torch.compile(fn, dynamic=False, options=options)

    encoder.vit.run_layers = compiled(encoder.vit.run_layers)
    encoder.projector.forward = compiled(encoder.projector.forward)
    if encoder.convnext is not None:
        encoder.convnext.stage_maps = compiled(encoder.convnext.stage_maps)
    return encoder
