"""Questions in, answers out: the jobs that put documents, vision and LLM together.

- ``model``: the front door (``fila_cli.load``): a loaded model with ask, chat, batch and close.
- ``ask``: ``Asker``, a loaded model answering a question about a document, from:
  ``pages`` (render and encode, the token cache), ``prompts`` (the text around the visual tokens,
  --together, --text-layer, fits-checks), ``prefix`` (the LLM's prefix states reused, a refused one
  decoded again), ``choice`` (the most confident page, the confidence) and ``timings``.
- ``records``: the one output record (ask, batch, chat; answered and failed) and ``Answer``.
- ``chat``: a conversation about a document, with the same prompt and prefix code.
- ``batch``: many documents and questions, one record each; ``run``: what every run that writes
  records shares (sink, --resume, summary, ``should_stop``); ``isolation``: the worker process that
  opens and renders untrusted documents; ``ray_batch``: the batch on a Ray cluster.

May import every lower layer (documents, vision, llm, bundles); never the CLI. Installs no signal
handler: the CLI owns the signals.
"""
