"""The package's layers, read from the source: no module imports from a layer above its own.

documents < vision < llm < bundles < qa/train/eval < serve < cli, with config, errors, gguf_files, atomic_files and
caches below them all. Imports inside functions count too: a lazy import of a higher layer is still a
dependency on it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fila_cli"
BOTTOM = 0
LAYERS = {"config": BOTTOM, "errors": BOTTOM, "gguf_files": BOTTOM, "manifests": BOTTOM, "caches": BOTTOM,
          "atomic_files": BOTTOM,
          "documents": 1, "vision": 2, "llm": 3, "bundles": 4, "qa": 5, "train": 5, "eval": 5, "serve": 6,
          "cli": 7}
# The package's own __init__ (lazy exports by name) and ``python -m fila_cli`` sit outside the layers.
ENTRY_POINTS = {"__init__", "__main__"}
# What a command that only parses options or lists files must not load.
HEAVY = {"torch", "timm", "transformers", "llama_cpp"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "fila_cli":
        return None
    if len(parts) == 1:
        return BOTTOM  # ``from fila_cli import __version__``
    return LAYERS[parts[1]]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every fila_cli import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module or ""))
    return [(line, module) for line, module in found if module.split(".")[0] == "fila_cli"]


def upward_imports() -> list[str]:
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.stem in ENTRY_POINTS:
            continue
        own = layer_of(module_name(path))
        for line, module in imported_modules(path):
            if layer_of(module) > own:
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return offences


def test_every_top_level_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert parts - ENTRY_POINTS <= set(LAYERS), f"give these a layer: {sorted(parts - ENTRY_POINTS - set(LAYERS))}"


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # The test above must be able to fail: a documents module that imports the CLI is caught.
    fake = tmp_path / "fila_cli"
    (fake / "documents").mkdir(parents=True)
    (fake / "documents" / "__init__.py").write_text("")
    (fake / "documents" / "bad.py").write_text("def f():\n    from ..cli.app import main\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert upward_imports() == ["fila_cli/documents/bad.py:2 imports fila_cli.cli.app"]


def modules_loaded_by(code: str) -> set[str]:
    completed = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                               capture_output=True, text=True, timeout=120, check=True)
    return set(completed.stdout.split())


def test_cache_info_needs_no_model_code():
    loaded = modules_loaded_by("from fila_cli.vision.token_cache import TokenCache, token_cache_key\nTokenCache().info()")
    assert not HEAVY & loaded, sorted(HEAVY & loaded)



def test_the_cli_and_its_help_load_no_model_code():
    # `fila --help`, `fila ask --help` and `fila weights` must start in a blink: no torch, no llama.cpp.
    loaded = modules_loaded_by(
        "import contextlib, io\n"
        "from fila_cli.cli.app import app\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    app(['ask', '--help'])\n")
    assert "fila_cli.cli.app" in loaded and not HEAVY & loaded, sorted(HEAVY & loaded)


def test_a_fusion_off_ask_loads_no_timm_transformers_or_torchvision(bundle, tmp_path):
    # `fila ask` start-up (issue 13): with fusion off nothing builds a ConvNeXt (timm), the ViT is
    # fila's own CLIP layers (no transformers) and anyres resizes with torch (no torchvision); the
    # command skips PyMuPDF's add-ons (the layout analyser's ONNX model, pymupdf4llm).
    from tests.helpers.bad_documents import make_good_pdf

    pdf = make_good_pdf(tmp_path / "page.pdf", ["Invoice 2291. Total due: 1,234.00 EUR."])
    argv = ["fila", "ask", str(pdf), "What is the total?", "--model", str(bundle), "--json", "--no-cache", "--max-tokens", "2"]
    code = (
        "import contextlib, io, sys\n"
        f"sys.argv = {argv!r}\n"
        "from fila_cli.cli.app import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main()\n"
        "assert '\"answer\"' in out.getvalue(), out.getvalue()\n")
    loaded = modules_loaded_by(code)
    assert {"llama_cpp", "torch", "pymupdf"} <= loaded, "the check must see the modules the answer needed"
    unwanted = {"timm", "transformers", "torchvision", "onnxruntime", "pymupdf.layout.onnx"}  # real imports, not None entries
    assert not unwanted & loaded, sorted(unwanted & loaded)
