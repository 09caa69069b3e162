"""FILA's two-stage training (``fila train``): LLaVA conversation data in, a bundle ``fila ask`` runs out.

Modules, in the order a run uses them: ``config`` (the run's settings), ``data`` (reading the
conversation files), ``chat`` (chat template, labels, the image placeholder), ``base`` (the
LLaVA-NeXT checkpoint to start from), ``build`` (the model and what trains in each stage),
``model`` (the training forward: Hybrid Encoder into the LLM), ``prepare`` (every sample tokenised
and measured once, bad ones skipped), ``loop`` (the optimiser loop, data parallelism, resume),
``checkpoint`` (safetensors + JSON, no pickles), ``report`` (metrics.jsonl, loss.png), ``export``
and ``gguf_export`` (fusion weights, GGUF LoRA adapter or full GGUF, ``bundle.json``).

    from fila_cli.train.config import TrainConfig
    from fila_cli.train.loop import train
    result = train(TrainConfig(stage=1, data="conv.json", images="imgs", base="llava-next", out="runs/s1"))
"""
