import pytest


@pytest.fixture(autouse=True)
def _private_token_cache(tmp_path, monkeypatch):
    """Every test gets its own visual-token cache (subprocesses inherit the variable)."""
    monkeypatch.setenv("FILA_CACHE_DIR", str(tmp_path / "fila-cache"))
