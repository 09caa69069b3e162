"""`fila weights`: list, download, describe and check model bundles.

Listings and reports go to stdout (``--json`` for scripts); download and hashing progress go to
stderr. Every user-facing failure is a :class:`~fila_cli.errors.FilaError`: one line on stderr
and its exit code, through :func:`run_cli` (the main CLI's ``handle_errors`` as a decorator).

Run standalone with ``python -m fila_cli.cli.weights``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from fila_cli.bundles import hub
from fila_cli.cli.help_format import PlainHelpGroup
from fila_cli.cli.support import handle_errors

F = TypeVar("F", bound=Callable[..., Any])


def run_cli(fn: F) -> F:
    """Run a command under the CLI's error handling: a FilaError becomes one line on stderr and
    its exit code, Ctrl-C exit 130, anything else a one-line bug report (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with handle_errors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


weights_app = typer.Typer(rich_markup_mode=None, cls=PlainHelpGroup,
    name="weights",
    help="List, download (`pull`), describe and check model bundles.",
    no_args_is_help=True,
    add_completion=False,
)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _size(size: int | None) -> str:
    return "?" if size is None else decimal(size)


@weights_app.command("list")
@run_cli
def list_command(as_json: bool = JSON_OPTION) -> None:
    """Known bundles and whether they are installed."""
    bundles = hub.list_bundles()
    if as_json:
        _echo_json([b.to_dict() for b in bundles])
        return
    table = Table("name", "installed", "size", "repository", box=None, pad_edge=False)
    for b in bundles:
        table.add_row(b.name, "yes" if b.installed else "no", _size(b.size), b.repo_id or "")
    Console(soft_wrap=True).print(table)


@weights_app.command("pull", short_help="Download a bundle into the Hugging Face cache and check it.")
@run_cli
def pull_command(
    name: str = typer.Argument(..., help="Known bundle name (see `fila weights list`)."),
    force: bool = typer.Option(False, "--force", help="Download again even if the files are cached."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars on stderr."),
) -> None:
    """Download a bundle into the Hugging Face cache and check its checksums."""
    bundle = hub.pull(name, force=force, progress=not no_progress)
    typer.echo(f"{bundle.name}: installed")
    for role, path in bundle.paths().items():
        typer.echo(f"  {role:<7} {path}")


@weights_app.command("info")
@run_cli
def info_command(
    target: str = typer.Argument(..., metavar="NAME|DIR", help="Bundle name or bundle directory."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Files, sizes, presence and settings of a bundle."""
    details = hub.info(target)
    if as_json:
        _echo_json(details.to_dict())
        return
    rows = [
        ("name", details.name),
        ("description", details.description),
        ("source", details.source),
        ("installed", "yes" if details.installed else "no"),
        ("template", details.template or "(the GGUF's chat template)"),
        ("n_ctx", str(details.n_ctx)),
        ("max visual tokens", str(details.max_visual_tokens)),
        ("fusion", details.fusion),
    ]
    if details.license:
        rows.append(("license", details.license))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
    typer.echo("files:")
    for f in details.files:
        where = f.path if f.present else "missing"
        typer.echo(f"  {f.role:<7} {f.filename}  {_size(f.size)}  {where}")


@weights_app.command("verify", short_help="Hash every file against the manifest.")
@run_cli
def verify_command(
    target: str = typer.Argument(..., metavar="NAME|DIR", help="Bundle name or bundle directory."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars on stderr."),
) -> None:
    """Hash every file against the manifest and check each GGUF fits its role."""
    report = hub.verify(target, progress=not no_progress)
    for check in report.files:
        typer.echo(f"{check.status:<9} {check.role:<7} {check.message}")
    report.raise_for_failure()


@weights_app.command("path", short_help="Print a bundle's folder, or the download cache.")
@run_cli
def path_command(
    target: str | None = typer.Argument(None, metavar="[NAME|DIR]", help="Bundle name or bundle directory; without it, the download cache.", show_default=False),
) -> None:
    """Print the folder of a bundle's files, or without NAME|DIR the cache directory bundles are downloaded to."""
    typer.echo(str(hub.cache_path() if target is None else hub.bundle_folder(target)))


if __name__ == "__main__":
    weights_app(prog_name="fila weights")
