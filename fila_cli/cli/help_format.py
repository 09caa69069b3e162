"""--help as click prints it, for a terminal of 80 columns and for a pipe alike.

Typer's Rich help truncates long flag names at 80 columns and shows switches as ``<bool>``; its
plain help writes required arguments as ``{FILE}`` and adds ``<str>``-style type labels. fila's
help is plain (``rich_markup_mode=None`` on every app) and, through the group class here: usage
``FILE QUESTION``, arguments without type labels, options with a metavar (``TEXT``,
``N``, ``PATH``) unless they name their own.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperGroup, TyperOption

# An option's value as --help names it, from its type (typer's ``bare_type``).
METAVARS = {"str": "TEXT", "int": "N", "float": "NUMBER", "path": "PATH"}


def plain_params(command: Any) -> Any:
    """Give ``command``'s parameters plain help names (idempotent)."""
    for param in command.params:
        if isinstance(param, TyperArgument):
            name = param.metavar or (param.name or "").upper()
            shown = name if param.nargs == 1 or name.endswith("...") else name + "..."
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
            param._usage_display_name = lambda shown=shown: shown  # type: ignore[method-assign]
        elif isinstance(param, TyperOption) and not param.is_flag and not param.count and param.metavar is None:
            bare = "path" if param.type_descriptor.is_path else param.bare_type().removesuffix(" | None")
            param.metavar = METAVARS.get(bare, bare.upper())
    return command


class PlainHelpGroup(TyperGroup):
    """A typer group whose own and whose commands' parameters get plain help names."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        plain_params(self)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        return None if command is None else plain_params(command)
