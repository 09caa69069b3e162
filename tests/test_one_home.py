"""Each piece of format knowledge is written once, read from the source: a second copy would drift.

GGUF files are opened (and their headers read) in ``gguf_files``; the fusion-config path rule and
the CLIP normalisation live in ``config``; visual-token counts come from ``vision.token_count``.
"""

from __future__ import annotations

import re
from pathlib import Path

from fila_cli.bundles.bundle import DEFAULT_MAX_VISUAL_TOKENS
from fila_cli.config import AnyresConfig, fusion_config_path
from fila_cli.documents.canvas import plan_canvas
from fila_cli.gguf_files import read_gguf_header
from fila_cli.vision.token_count import count_visual_tokens
from tests.helpers.tiny_llm import build_tiny_llm

PACKAGE = Path(__file__).resolve().parents[1] / "fila_cli"


def modules_matching(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if regex.search(path.read_text()))


def test_only_gguf_files_opens_a_gguf_reader():
    assert modules_matching(r"GGUFReader\(") == ["gguf_files.py"]


def test_the_fusion_config_path_rule_is_written_once():
    # A fusion config sits beside its weights with the .json suffix: only config.py spells that rule.
    assert modules_matching(r"with_suffix\((FUSION_CONFIG_SUFFIX|[\"']\.json)") == ["config.py"]
    assert fusion_config_path("w/fusion.safetensors") == Path("w/fusion.json")


def test_the_clip_normalisation_is_written_once():
    assert modules_matching(r"0\.48145466|0\.26862954") == ["config.py"]


def test_the_visual_token_budget_is_counted_not_written():
    assert not modules_matching(r"\b2928\b")
    # The largest page is one shaped like the 672x672 canvas: 576 global + 48 rows of 48 + 1.
    anyres = AnyresConfig()
    square = count_visual_tokens(plan_canvas((672, 672), anyres), anyres.crop_size // 14)
    assert DEFAULT_MAX_VISUAL_TOKENS == square == 576 + 48 * 49


def test_the_gguf_header_gives_the_trained_context(tmp_path):
    header = read_gguf_header(build_tiny_llm(tmp_path / "llm.gguf", n_ctx_train=777, name="short"))
    assert (header.architecture, header.name, header.context_length, header.is_vision) == ("llama", "short", 777, False)
