"""The ``fila`` command: a thin layer of options and output over the library.

- ``app``: the typer app; it only mounts the commands. One module per command: ``ask``, ``chat``,
  ``batch``, ``sample``, ``crops`` (drawing in ``crops_view``), ``encode``, ``eval``, ``train``,
  ``weights``, ``cache``.
- ``options``: the options the model-loading commands share (``model_command``) and the model's loading.
- ``support``: error lines and exit codes; ``stopping``: the signals; ``help_format``: plain --help;
  ``completions``: shell completion scripts.

The top layer: may import anything below it; nothing imports it.
"""
