"""Fixtures every test module shares: a private token cache per test, and the tiny bundles built once.

The bundles are session-scoped and read-only: a test that changes a bundle's files copies it (or builds
its own) under its ``tmp_path``. Variants a few modules need (an LLM trained for 8k tokens) have their
own named fixture, built once too. Plain helpers (the ``fila`` subprocess) live in ``tests.helpers``.
"""

from pathlib import Path

import pytest

from tests.helpers.tiny_bundle import build_tiny_bundle

# The context an "8k" LLM's GGUF says it was trained on: two A4 pages of visual tokens fit.
EIGHT_K_CONTEXT = 8192


@pytest.fixture(autouse=True)
def _private_token_cache(tmp_path, monkeypatch):
    """Every test gets its own visual-token cache (subprocesses inherit the variable)."""
    monkeypatch.setenv("FILA_CACHE_DIR", str(tmp_path / "fila-cache"))


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The tiny random-weight bundle directory (tests.helpers.tiny_bundle, seed 0), built once a session."""
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def bundle_8k(tmp_path_factory) -> Path:
    """The tiny bundle whose LLM was trained (as its GGUF says) on 8,192 tokens: two A4 pages fit."""
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle-8k"), n_ctx_train=EIGHT_K_CONTEXT)
