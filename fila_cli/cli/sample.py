"""`fila sample`: write a sample document to try fila on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fila_cli.cli.support import handle_errors, stderr


def sample(
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Where to write the sample PDF, e.g. invoice.pdf (its folder must exist).", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Write a sample document to try fila on: a three-page invoice (two typed pages, one scanned).

    Then: fila ask invoice.pdf "What is the total due?"
    """
    with handle_errors():
        from fila_cli.documents.sample import write_sample_invoice

        path = write_sample_invoice(output, overwrite=force)
        stderr.print(f"{path}: a 3-page sample invoice (pages 1-2 typed, page 3 a scanned delivery note). "
                     f'Try: fila ask {path} "What is the total due?"', highlight=False, markup=False)
