"""`fila ask` as a person or a script sees it: a streamed Rich panel, or one JSON object."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fila_cli.cli.options import CommandOptions, ServerOption, model_command
from fila_cli.cli.support import FILE_HELP, handle_errors, note_line, stderr, warning_line
from fila_cli.errors import FilaError

if TYPE_CHECKING:
    from rich.panel import Panel
    from rich.progress import Progress

    from fila_cli.qa.options import AskOptions, ModelOptions
    from fila_cli.qa.records import Answer


@model_command()
def ask(
    file: Annotated[Path, typer.Argument(metavar="FILE", help=FILE_HELP, show_default=False)],
    question: Annotated[str, typer.Argument(metavar="QUESTION", help="The question, or - to read it from stdin.", show_default=False)],
    pages: Annotated[str | None, typer.Option("--pages", help="Pages to read, 1-based, e.g. 1,3-5. Default: fila chooses (by the text layer, else the most confident page).", show_default=False)] = None,
    together: Annotated[bool, typer.Option("--together", help="Read the --pages in one prompt, each introduced by its page number (for questions across pages).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (the default when stdout is not a terminal).")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the answer when it is complete instead of as it is generated.")] = False,
    show_evidence: Annotated[Path | None, typer.Option("--show-evidence", help="Write the page where the answer is (PNG) with the crop boundaries and the answer's evidence boxes, red where a boundary cuts them (as `fila crops --find`).", show_default=False)] = None,
    server: ServerOption = None,
    keep_alive: Annotated[str | None, typer.Option("--keep-alive", envvar="FILA_KEEP_ALIVE", metavar="DURATION", help="Keep the model loaded in a background server for this long after the last ask (e.g. 5m; $FILA_KEEP_ALIVE): later asks with the same model skip the load. See `fila serve`.", show_default=False)] = None,
    *,
    options: CommandOptions,
) -> None:
    """Answer a QUESTION about FILE, citing the page the answer came from.

    On a terminal the answer is shown in a panel, streamed as it is generated. Piped, or with --json,
    stdout holds exactly one JSON object: the record described in the README ("The JSON contract");
    when it fails, the same keys with "error": {"kind", "message"} and the others null.
    """
    as_json = json_output(as_json)
    asked: list[str] = [question]  # the question as read (from stdin for "-"), for a failed record
    with handle_errors(options.verbose), failed_record_on_stdout(file, lambda: asked[-1], options.values["model"], as_json):
        asked.append(read_question(question))
        run_ask(file, asked[-1], options.model(), options.ask(pages=pages, together=together),
                as_json=as_json, stream=not no_stream, server=server, keep_alive=keep_alive, show_evidence=show_evidence)


def read_question(question: str) -> str:
    """The question as given, or for ``-`` read from stdin (asked for on a terminal)."""
    from fila_cli.errors import UsageError

    if question != "-":
        if not question.strip():
            raise UsageError("the question is empty: give its text, or - to read it from stdin")
        return question.strip()
    if sys.stdin.isatty():
        print("fila: type the question, then Ctrl-D on a line of its own:", file=sys.stderr, flush=True)
    text = sys.stdin.read()
    if not text.strip():
        raise UsageError("the question read from stdin (-) is empty: pipe it in, e.g. echo 'What is the total?' | fila ask FILE -")
    return text.strip()


def _answer_panel(text: str, title: str, subtitle: str | None = None, notice: str | None = None) -> Panel:
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    body: Text | Group = Text(text or "…")
    if notice is not None:  # one line under the answer (in full on stderr)
        body = Group(body, Text(f"⚠ {notice}", style="yellow", no_wrap=True, overflow="ellipsis"))
    return Panel(body, title=title, subtitle=subtitle, title_align="left", subtitle_align="right")


def _citation(answer: Answer) -> str:
    pages = ", ".join(str(p) for p in answer.pages)
    confidence = "" if answer.confidence is None else f" · confidence {answer.confidence:.2f}"
    t = answer.timings
    return (f"page {pages} · {answer.model}{confidence} · render {t.render_s:.1f}s encode {t.encode_s:.1f}s "
            f"prefill {t.prefill_s:.1f}s generate {t.generate_s:.1f}s")


def _page_progress(progress: Progress):
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if total <= 1:
            return
        if task is None:
            task = progress.add_task("reading pages", total=total)
        progress.update(task, completed=done)

    return update


def json_output(as_json: bool) -> bool:
    """Whether ``fila ask`` prints its record on stdout: with --json, or when stdout is not a terminal."""
    return as_json or not sys.stdout.isatty()


@contextlib.contextmanager
def failed_record_on_stdout(file: Path, question: Callable[[], str], model: ModelOptions | str | None,
                            as_json: bool) -> Iterator[None]:
    """With JSON output, a failure prints its record on stdout (stdout holds exactly one record,
    a failed one too); the error line on stderr and the exit code stay as they are."""
    try:
        yield
    except FilaError as error:
        if as_json:  # the record a server sent (--server), else made here
            from fila_cli.qa.records import failed_record

            record = getattr(error, "record", None) or failed_record(file, question(), _model_name(model), error.kind,
                                                                     str(error))
            print(json.dumps(record, ensure_ascii=False), flush=True)
        raise


def _model_name(model: ModelOptions | str | None) -> str | None:
    """The record's name for the model; None when the model itself is what failed to resolve."""
    from fila_cli.qa.options import ModelOptions

    try:
        return (model if isinstance(model, ModelOptions) else ModelOptions(model=model)).bundle().name
    except FilaError:
        return None


def run_ask(file: Path, question: str, model: ModelOptions, options: AskOptions, *, as_json: bool, stream: bool,
            server: str | None = None, keep_alive: str | None = None, show_evidence: Path | None = None) -> None:
    from fila_cli.cli.options import load_asker
    from fila_cli.cli.serve import remote_asker
    from fila_cli.cli.stopping import stop_signals
    from fila_cli.documents.document import open_document
    from fila_cli.errors import UsageError

    if show_evidence is not None and show_evidence.suffix.lower() != ".png":
        raise UsageError(f"{show_evidence}: the picture is written as PNG; name it *.png")
    if show_evidence is not None and (server or keep_alive):
        raise UsageError("--show-evidence draws with the model's canvases here: drop --server/--keep-alive, or "
                         "draw it with `fila crops FILE --find ANSWER -o PICTURE.png`")
    # Check the document before loading gigabytes of model: a typo fails in milliseconds.
    with open_document(file, password=options.password):
        pass
    # One answer, nothing to finish: Ctrl-C or SIGTERM stops it at once (exit 130 or 143).
    with stop_signals(immediate=True):
        asker = remote_asker(model, server, keep_alive) if server or keep_alive else load_asker(model)
        answer = _ask(file, question, asker, options, as_json=as_json, stream=stream)
        if show_evidence is not None:
            _write_evidence_picture(file, show_evidence, answer, asker, options)


def _write_evidence_picture(file: Path, output: Path, answer: Answer, asker, options: AskOptions) -> None:
    """``--show-evidence``: the page where the answer is (else the page it came from), as ``fila crops --find``."""
    from fila_cli.cli.crops_view import write_evidence_picture
    from fila_cli.documents.evidence import Evidence

    evidence = answer.evidence
    page = evidence.boxes[0].page if evidence is not None and evidence.boxes else answer.pages[0]
    write_evidence_picture(file, output, page, evidence or Evidence((), None), asker.encoder.anyres,
                           asker.encoder.highres_scale, options.password)
    boxes = len(evidence.on_page(page)) if evidence is not None else 0
    where = f"{boxes} evidence box{'es' if boxes != 1 else ''}" if boxes else f"answer not located ({evidence.reason if evidence else 'not looked for'})"
    stderr.print(f"{output}: page {page}, crop boundaries and {where}", highlight=False, markup=False)


def _notice(answer: Answer, asker) -> str | None:
    from fila_cli.qa.answer_evidence import boundary_notice

    return boundary_notice(answer.evidence, fusion=asker.fusion)


def _ask(file: Path, question: str, asker, options: AskOptions, *, as_json: bool, stream: bool) -> Answer:
    from rich.console import Console
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.text import Text

    from fila_cli.qa.run import json_line

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=stderr, transient=True, disable=not stderr.is_terminal)
    if as_json:
        with progress:
            answer = asker.ask(file, question, options, on_page=_page_progress(progress))
        _warn(answer, _notice(answer, asker))
        sys.stdout.write(json_line(answer.to_json()).decode("utf-8"))  # a non-UTF-8 file name: \udcXX escapes
        sys.stdout.flush()
        return answer

    console = Console()
    title = f"{file.name}: {question}"
    if not stream:
        with progress:
            answer = asker.ask(file, question, options, on_page=_page_progress(progress))
        console.print(_answer_panel(answer.answer, title, _citation(answer), _notice(answer, asker)))
        stderr.print(Text(answer.page_reason, style="dim"))
        _warn(answer, _notice(answer, asker))
        return answer
    streamed: list[str] = []
    with Live(_answer_panel("", title), console=console, refresh_per_second=12, transient=False) as live, progress:

        def on_text(piece: str) -> None:
            streamed.append(piece)
            live.update(_answer_panel("".join(streamed).strip(), title))

        answer = asker.ask(file, question, options, on_text=on_text, on_page=_page_progress(progress))
        live.update(_answer_panel(answer.answer, title, _citation(answer), _notice(answer, asker)))
    stderr.print(Text(answer.page_reason, style="dim"))
    _warn(answer, _notice(answer, asker))
    return answer


def _warn(answer: Answer, notice: str | None) -> None:
    for warning in answer.warnings:
        warning_line(warning)
    if notice is not None:
        note_line(notice)
