import sys
from pathlib import Path

# Test helpers (tiny model builders) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture(autouse=True)
def _private_token_cache(tmp_path, monkeypatch):
    """Every test gets its own visual-token cache (subprocesses inherit the variable)."""
    monkeypatch.setenv("FILA_CACHE_DIR", str(tmp_path / "fila-cache"))
