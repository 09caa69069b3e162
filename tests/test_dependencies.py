"""Every third-party module the package imports is declared in pyproject.toml (none arrives by luck,
as torchvision once did through timm)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fila_cli"


def imported_top_level_modules() -> set[str]:
    """Top-level names of every absolute import in the package, lazy ones inside functions included."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def declared_distributions() -> set[str]:
    """The dependencies, and the optional extras a feature names (``ray`` for ``fila batch --ray``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [spec for name, specs in project["optional-dependencies"].items() if name != "test" for spec in specs]
    return {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in project["dependencies"] + extras}


def test_every_imported_distribution_is_declared():
    third_party = imported_top_level_modules() - set(sys.stdlib_module_names) - {"fila_cli", "__future__"}
    providers = packages_distributions()
    undeclared = {}
    for module in sorted(third_party):
        distributions = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not distributions & declared_distributions():
            undeclared[module] = sorted(distributions)
    assert undeclared == {}, f"imported but not in pyproject.toml's dependencies: {undeclared}"
    assert "timm" in third_party  # the check sees an import made inside a function (ConvNeXtBranch's)
