"""`fila cache info` and `fila cache clear`: the caches of visual tokens and LLM prefix states."""

from __future__ import annotations

from typing import Annotated

import typer

from fila_cli.cli.help_format import PlainHelpGroup
from fila_cli.cli.support import handle_errors

cache_app = typer.Typer(rich_markup_mode=None, cls=PlainHelpGroup, help="The caches: visual tokens (pages already encoded are not encoded again) and LLM prefix "
                             "states (pages already read are not prefilled again).", no_args_is_help=True)


@cache_app.command("info", short_help="Where the caches are, their entries, size and cap.")
def cache_info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False) -> None:
    """Where the caches are, how many entries they hold, their size and the cap they share ($FILA_CACHE_DIR overrides the place)."""
    with handle_errors():
        import json

        from rich.filesize import decimal

        from fila_cli.caches.budget import BYTES_PER_GB, DEFAULT_CACHE_MAX_GB
        from fila_cli.caches.folder import CacheFolder

        info = CacheFolder().info()
        if as_json:
            print(json.dumps(info.to_json(), indent=2))
            return
        kinds = {"tokens": "pages of visual tokens", "llm-prefix": "LLM prefix states"}
        for store in info.stores:
            print(f"{store.path}: {store.entries} {kinds.get(store.name, 'entries')}, {decimal(store.bytes)}")
        print(f"total {decimal(info.bytes)} against one cap for both, --cache-max-gb (default {DEFAULT_CACHE_MAX_GB:g}, "
              f"{decimal(int(DEFAULT_CACHE_MAX_GB * BYTES_PER_GB))}): applied at each write, least recently used first")


@cache_app.command("clear", short_help="Delete every cached page (only files fila wrote).")
def cache_clear() -> None:
    """Delete every cached page: visual tokens and LLM prefix states (only the files fila wrote)."""
    with handle_errors():
        from fila_cli.caches.folder import CacheFolder

        folder = CacheFolder()
        removed = folder.clear()
        print(f"{folder.root}: removed {removed.pop('tokens')} pages of visual tokens, {removed.pop('llm-prefix')} "
              f"LLM prefix states" + "".join(f", {n} files of an older cache layout" for n in removed.values() if n))
