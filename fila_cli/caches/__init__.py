"""fila's caches on disk, owned here: the folder and its layout, one size cap, info and clear,
verified entries, and the protocol the stores share.

The stores themselves sit with what they hold: the visual tokens in ``vision/token_cache.py``, the
LLM prefix states in ``llm/prefix_store.py``, eval's in-memory pages in ``eval/run.py``.

Modules: ``folder`` (the folder, its layout, ``CacheFolder.info``/``clear``, ``KeyedCache``),
``entries`` (one store's verified entries), ``budget`` (the one cap). This ``__init__`` imports
nothing, so that a command parsing its options (``budget.DEFAULT_CACHE_MAX_GB``) loads no numpy.
"""
