"""`fila chat` on a terminal (Rich prompt, streamed answers, slash commands) or piped (JSON lines)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fila_cli.cli.options import CommandOptions, ServerOption, model_command
from fila_cli.cli.support import FILE_HELP, error_line, handle_errors, note_line, stderr, warning_line
from fila_cli.errors import ExitCode, FilaError, UsageError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.panel import Panel

    from fila_cli.cli.stopping import StopRequest
    from fila_cli.qa.chat import ChatSession, Turn
    from fila_cli.qa.options import AskOptions, ModelOptions


@model_command()
def chat(
    file: Annotated[Path, typer.Argument(metavar="FILE", help=FILE_HELP, show_default=False)],
    pages: Annotated[str | None, typer.Option("--pages", help="Pages in the conversation, 1-based, e.g. 2 or 2,9 (several: together in one prompt). Default: page 1; /page N moves.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Read one question a line from stdin and print one JSON line per answer (the default when stdin is not a terminal).")] = False,
    server: ServerOption = None,
    *,
    options: CommandOptions,
) -> None:
    """Talk with a document: the model loads once, the page is read once, follow-up questions see the conversation.

    Commands: /page N (move), /page +N (add a page), /pages, /crops [FILE.png], /clear, /save FILE.json,
    /help, /quit. Ctrl-C stops the answer in progress; Ctrl-D, /quit or exit leaves. Piped (one question
    a line on stdin), stdout holds one JSON line per answer; exit 1 when a question or command failed.
    """
    with handle_errors(options.verbose):
        raise typer.Exit(run_chat(file, options.model(), options.ask(pages=pages, together=True), as_json=as_json,
                                  server=server))


PROMPT = "you> "
COMMANDS = (
    ("/page N", "move to page N (only it in the context)"),
    ("/page +N", "add page N to the pages in the context (questions across pages)"),
    ("/pages", "list the pages in the context and how full the context is"),
    ("/crops [FILE.png]", "write the crop picture of the current page"),
    ("/clear", "forget the conversation (the pages stay)"),
    ("/save FILE.json", "write the transcript"),
    ("/help", "this list"),
    ("/quit, /exit, exit", "leave (or Ctrl-D)"),
    ("Ctrl-C", "stop the answer in progress"),
)
# Lines that leave the chat, on a terminal and piped alike: users type them expecting to leave,
# and no one asks a document the one word "exit".
QUIT_LINES = ("/quit", "/exit", "exit", "quit")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def run_chat(file: Path, model: ModelOptions, options: AskOptions, *, as_json: bool, server: str | None = None) -> int:
    """Signals (cli/stopping.py): while an answer streams, Ctrl-C stops the answer and the session
    goes on; SIGTERM stops it too, then the session ends (exit 143). Elsewhere (loading, reading a
    page, waiting for a question) a signal stops at once; Ctrl-C at the prompt only clears the line."""
    from rich.text import Text

    from fila_cli.cli.options import load_asker
    from fila_cli.cli.stopping import stop_signals
    from fila_cli.documents.document import open_document
    from fila_cli.qa.chat import ChatSession

    # Check the document before loading gigabytes of model: a typo fails in milliseconds.
    with open_document(file, password=options.password) as document, stop_signals(immediate=True) as stop:
        if server is not None:
            from fila_cli.cli.serve import run_remote_chat

            return run_remote_chat(server, file, options, document, lambda session: _piped(session, stop)
                                   if as_json or not sys.stdin.isatty() else _interactive(session, stop))
        asker = load_asker(model)
        with stderr.status("reading the page…"):
            session = ChatSession(asker, document, options, on_notice=lambda message: stderr.print(
                Text(f"fila: {message}", style="yellow")))
        for warning in session.warnings:
            warning_line(warning)
        if as_json or not sys.stdin.isatty():
            return _piped(session, stop)
        return _interactive(session, stop)


@contextlib.contextmanager
def _answering(stop: StopRequest) -> Iterator[None]:
    """While an answer is decoded, the first signal only asks it to stop (the turn is kept, marked
    interrupted); a second one stops at once."""
    stop.immediate = False
    try:
        yield
    finally:
        stop.immediate = True


# -- piped: one question a line in, one JSON line out ------------------------------------------


def _piped(session: ChatSession, stop: StopRequest) -> int:
    """Exit 0 when every question and command succeeded, 1 when some failed (as ``fila batch``)."""
    failed = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line.lower() in QUIT_LINES:
            break
        if line.startswith("/"):
            # What a command says goes to stderr: stdout is JSON only.
            failed += not _run_command(session, line, stderr, stop)
            continue
        try:
            with _answering(stop):
                turn = session.ask(line, should_stop=stop.requested)
                record = session.record(turn)
            _say_notice(session, turn)
        except FilaError as error:
            failed += 1
            error_line(str(error))
            record = session.failed_record(line, error)
        print(json.dumps(record, ensure_ascii=False), flush=True)  # whole, even when a signal stopped the answer
        if stop.requested():
            error_line("interrupted")
            return stop.exit_code
    return int(ExitCode.FAILURE) if failed else int(ExitCode.OK)


# -- on a terminal ---------------------------------------------------------------------------------


def _interactive(session: ChatSession, stop: StopRequest) -> int:
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False)
    console.print(_header(session))
    while True:
        try:
            line = console.input(Text(PROMPT, style="bold"))
        except EOFError:  # Ctrl-D
            console.print()
            return int(ExitCode.OK)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as shells do; SIGTERM: the end
            if stop.signum == signal.SIGTERM:
                raise
            stop.reset()
            console.print(Text("\n(Ctrl-D or /quit to leave)", style="dim"))
            continue
        line = line.strip()
        if not line:
            continue
        if line.lower() in QUIT_LINES:
            return int(ExitCode.OK)
        if line.startswith("/"):
            _run_command(session, line, console, stop)
            continue
        turn = _ask_streaming(session, line, console, stop)
        if turn is not None:
            stderr.print(Text(_turn_footer(session, turn), style="dim"))
            _say_notice(session, turn)
        if stop.signum == signal.SIGTERM:  # the answer in flight stopped, shown whole: now leave
            error_line("interrupted")
            return stop.exit_code
        stop.reset()  # Ctrl-C stopped that answer; the session goes on


def _say_notice(session: ChatSession, turn: Turn) -> None:
    """The crop-boundary notice, when a crop boundary cuts the answer and fusion is off."""
    from fila_cli.qa.answer_evidence import boundary_notice

    # A served chat's model may not say whether it fuses: no notice then rather than a wrong one.
    notice = boundary_notice(turn.evidence, fusion=getattr(session.asker, "fusion", True))
    if notice is not None:
        note_line(notice)


def _ask_streaming(session: ChatSession, question: str, console: Console, stop: StopRequest) -> Turn | None:
    from rich.text import Text

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        console.print(Text("fila> ", style="bold cyan"), end="")
        with _answering(stop):
            return session.ask(question, on_text=show, should_stop=stop.requested)
    except FilaError as error:
        console.print()
        error_line(str(error))
        return None
    finally:
        console.print()


def _header(session: ChatSession) -> Panel:
    from rich.panel import Panel
    from rich.text import Text

    pages = ", ".join(map(str, session.page_numbers))
    body = Text.assemble(
        (f"{session.file}", "bold"), f" · page {pages} of {session.document.page_count} · {session.asker.model_name}\n",
        f"{session.n_visual} visual tokens · context {session.context_used} of {session.backend.n_ctx} used\n",
        ("Ask a question; /help lists the commands; Ctrl-C stops an answer; Ctrl-D or /quit leaves.", "dim"),
    )
    return Panel(body, title="fila chat", title_align="left")


def _turn_footer(session: ChatSession, turn: Turn) -> str:
    confidence = "" if turn.confidence is None else f" · confidence {turn.confidence:.2f}"
    stopped = " · stopped" if turn.interrupted else ""
    return (f"page {', '.join(map(str, turn.pages))}{confidence}{stopped} · {turn.tokens['prompt']} new prompt tokens, "
            f"{turn.tokens['generated']} generated · prefill {turn.timings.prefill_s:.1f}s generate "
            f"{turn.timings.generate_s:.1f}s · context {session.context_used}/{session.backend.n_ctx}")


# -- slash commands --------------------------------------------------------------------------------


def _run_command(session: ChatSession, line: str, out: Console, stop: StopRequest) -> bool:
    """Run a slash command; False when it failed (said on stderr)."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    handler = _HANDLERS.get(name)
    if handler is None:
        error_line(f"unknown command {name}; /help lists the commands")
        return False
    try:
        handler(session, argument, out)
        return True
    except FilaError as error:
        error_line(str(error))
        return False
    except KeyboardInterrupt:  # Ctrl-C while a page was read: the session stays as it was
        session.recover()
        if stop.signum == signal.SIGTERM:
            raise
        stop.reset()
        error_line(f"{name} interrupted; the pages and the conversation are as before")
        return False


def _page(session: ChatSession, argument: str, out: Console) -> None:
    add = argument.startswith("+")
    number = argument.lstrip("+").strip()
    if not number.isdigit():
        raise UsageError("/page needs a page number: /page 3 (move) or /page +3 (add)")
    with stderr.status(f"reading page {number}…"):
        (session.add_page if add else session.go_to_page)(int(number))
    _pages(session, "", out)


def _pages(session: ChatSession, argument: str, out: Console) -> None:
    for page in session.pages:
        out.print(f"page {page.index + 1}: {len(page.visual)} visual tokens")
    out.print(f"context: {session.context_used} of {session.backend.n_ctx} tokens used, "
              f"{plural(session.turns_in_context, 'turn')} of conversation")


def _crops(session: ChatSession, argument: str, out: Console) -> None:
    from fila_cli.atomic_files import check_output_folder
    from fila_cli.cli.crops_view import draw_crops
    from fila_cli.documents.canvas import plan_canvas
    from fila_cli.documents.render import render_for_canvas

    page = session.pages[-1]
    path = Path(argument or f"{Path(session.file).stem}-page{page.index + 1}-crops.png")
    if path.suffix.lower() != ".png":
        raise UsageError(f"{path}: the picture is written as PNG; name it *.png")
    check_output_folder(path)
    image = render_for_canvas(session.document, page.index, session.asker.encoder.anyres)
    geometry = plan_canvas((image.height, image.width), session.asker.encoder.anyres)
    try:
        draw_crops(image, geometry).save(path)
    except OSError as error:
        raise UsageError(f"{path}: cannot write it ({error.strerror or error}); check the folder") from None
    rows, cols = geometry.grid
    out.print(f"{path}: page {page.index + 1}, {rows}x{cols} crops")


def _clear(session: ChatSession, argument: str, out: Console) -> None:
    session.clear()
    out.print("the conversation is forgotten; the page stays")


def _save(session: ChatSession, argument: str, out: Console) -> None:
    if not argument:
        raise UsageError("/save needs a file name: /save transcript.json")
    out.print(f"{session.save(argument)}: {plural(len(session.history), 'turn')}")


def _help(session: ChatSession, argument: str, out: Console) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for command, what in COMMANDS:
        table.add_row(command, what)
    out.print(table)


_HANDLERS: dict[str, Callable[[ChatSession, str, Console], None]] = {
    "/page": _page, "/pages": _pages, "/crops": _crops, "/clear": _clear, "/save": _save, "/help": _help,
}
