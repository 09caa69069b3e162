"""The ``fila`` command line: one module per command (``cli/<command>.py``), mounted here.

A thin layer over the library (``from fila_cli import ...``): each command module parses its
options and draws its output; nothing here but the app, the mounting and ``main``.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from fila_cli.cli import ask, batch, chat, crops, encode, sample
from fila_cli.cli import serve as serve_command
from fila_cli.cli.cache import cache_app
from fila_cli.cli.eval import eval_app
from fila_cli.cli.help_format import PlainHelpGroup
from fila_cli.cli.support import EXIT_CODES_HELP
from fila_cli.cli.train import train_app
from fila_cli.cli.weights import weights_app

# The main job first, then the tools around it.
COMMAND_ORDER = ("ask", "chat", "batch", "serve", "sample", "crops", "encode", "eval", "train", "weights", "cache")


class _MainJobFirst(PlainHelpGroup):
    def list_commands(self, ctx) -> list[str]:
        rank = {name: index for index, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))


app = typer.Typer(rich_markup_mode=None,
    name="fila",
    cls=_MainJobFirst,
    help="Answer questions about documents with a local FILA vision-language model.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        from fila_cli import __version__

        print(f"fila {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Answer questions about documents with a local FILA vision-language model."""


# One line per command: its module holds its options, its help and its output.
app.command("ask", epilog=EXIT_CODES_HELP, short_help="Answer a question about a document, citing the page.")(ask.ask)
app.command("chat", epilog=EXIT_CODES_HELP, short_help="Talk with a document: follow-ups see the conversation.")(chat.chat)
app.command("batch", epilog=EXIT_CODES_HELP, short_help="Answer questions over many documents, as JSON lines.")(batch.batch)
app.command("sample", epilog=EXIT_CODES_HELP, short_help="Write a sample invoice to try fila on.")(sample.sample)
app.command("crops", epilog=crops.CROPS_EPILOG + "\n\n" + EXIT_CODES_HELP,
            short_help="Draw how a page is cut into crops; locate text on it.")(crops.crops)
app.command("encode", epilog=EXIT_CODES_HELP)(encode.encode)
app.add_typer(eval_app, name="eval", short_help="Score a model on DocVQA, InfoVQA, TextVQA, ChartQA, fragmentation.")
app.add_typer(train_app, name="train", help="Train FILA's fusion (and LLM) from LLaVA-NeXT weights; export a bundle.",
              short_help="Train FILA's fusion (and LLM); export a bundle.")
app.add_typer(weights_app, name="weights", help="List, download, inspect and verify model bundles.")
app.add_typer(cache_app, name="cache", short_help="The caches of visual tokens and LLM prefix states.")
serve_command.mount(app)


# PyMuPDF's optional add-ons, imported by ``import pymupdf`` when installed (PyMuPDF 2 installs
# both): the layout analyser loads an ONNX model at import, pymupdf4llm imports onnxruntime and
# its OCR helpers. ~0.7 s of every command's start-up, for ``Page.get_layout`` and
# ``pymupdf.to_markdown``, which fila never calls.
PYMUPDF_ADDONS_FILA_NEVER_USES = ("pymupdf.layout", "pymupdf4llm")


def _skip_pymupdf_addons() -> None:
    """A ``None`` in sys.modules makes an import fail, which PyMuPDF takes as "not installed".
    Only the ``fila`` command does this: a program importing fila_cli keeps the add-ons."""
    if "pymupdf" not in sys.modules:
        for name in PYMUPDF_ADDONS_FILA_NEVER_USES:
            sys.modules.setdefault(name, None)


def main() -> None:
    _skip_pymupdf_addons()
    app()


if __name__ == "__main__":
    main()
