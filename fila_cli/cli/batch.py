"""`fila batch` as a script sees it: JSON lines on stdout or in a file, progress and summary on stderr."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fila_cli.cli.options import CommandOptions, ServerOption, model_command
from fila_cli.cli.support import check_resumable_output, handle_errors, note_line, stderr, warning_line
from fila_cli.errors import ExitCode, FilaError, UsageError
from fila_cli.qa.options import DEFAULT_PIPELINE_DEPTH, DEFAULT_RAY_CPUS, DEFAULT_TIMEOUT_S, BatchOptions

if TYPE_CHECKING:
    from fila_cli.cli.ray_driver import DriverStatus
    from fila_cli.cli.stopping import StopRequest
    from fila_cli.qa.options import AskOptions, ModelOptions
    from fila_cli.qa.run import BatchSummary


@model_command(compile_option=True)
def batch(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...", help="Documents: files, folders (their PDFs and images) and globs.", show_default=False)],
    question: Annotated[list[str], typer.Option("--question", "-q", metavar="TEXT", help="A question; repeat for several.", show_default=False)] = [],  # noqa: B006 (typer copies it)
    questions_file: Annotated[Path | None, typer.Option("--questions", metavar="FILE", help="A file of questions, one per line; blank lines and lines starting with # are skipped.", show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write JSON lines to this file (default: stdout).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUTPUT: skip the (document, question, model) records it already holds.")] = False,
    pages: Annotated[str | None, typer.Option("--pages", help="Pages to read in every document, 1-based (default: fila chooses).", show_default=False)] = None,
    together: Annotated[bool, typer.Option("--together", help="Read each document's --pages in one prompt: one record per document and question, listing every page.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", metavar="SECONDS", help="Seconds the document worker may spend on one document (opening, choosing pages, rendering; not the model's time) before it is recorded as a timeout.")] = DEFAULT_TIMEOUT_S,
    ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help="Run across a Ray cluster: auto, local, or its address (docs/ray.md). Needs the ray extra: pip install fila-cli[ray]", show_default=False)] = None,
    ray_cpus: Annotated[float, typer.Option("--ray-cpus", help="With --ray on CPU-only nodes: CPUs per worker (one model each). On GPU nodes each worker takes one GPU.")] = DEFAULT_RAY_CPUS,
    pipeline_depth: Annotated[int | None, typer.Option("--pipeline-depth", metavar="N", help=f"Pages rendered and encoded ahead while the LLM answers (0: one stage at a time). Default: {DEFAULT_PIPELINE_DEPTH}, or --parallel's N.", show_default=False)] = None,
    parallel: Annotated[int, typer.Option("--parallel", metavar="N", help="Answer up to N documents' questions side by side in one LLM context: for a GPU; costs N KV caches (docs/batch.md).")] = 1,
    server: ServerOption = None,
    *,
    options: CommandOptions,
) -> None:
    """Answer questions over many documents: one JSON record per (document, question).

    Each record has the `fila ask --json` keys plus "sha256" (of the document); a failure is a record
    too, with "error": {"kind", "message"}. Records are written and flushed one by one, so an
    interrupted batch loses at most the record in flight; `--resume` continues it. Exit 0 when every
    record succeeded, 1 when some failed, 130 on Ctrl-C, 143 on SIGTERM.
    """
    with handle_errors(options.verbose):
        raise typer.Exit(run_batch_command(
            paths, questions=question, questions_file=questions_file, recursive=recursive, output=output,
            resume=resume,
            batch=BatchOptions(timeout_s=timeout, pipeline_depth=pipeline_depth, parallel=parallel, ray_address=ray,
                               ray_cpus=ray_cpus),
            model=options.model(), ask=options.ask(pages=pages, together=together), server=server,
            verbose=options.verbose))


def run_batch_command(paths: list[str], *, questions: list[str], questions_file: Path | None, recursive: bool,
                      output: Path | None, resume: bool, batch: BatchOptions, model: ModelOptions,
                      ask: AskOptions, server: str | None = None, verbose: bool = False) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fila_cli.cli.options import load_asker
    from fila_cli.cli.stopping import stop_signals
    from fila_cli.qa.batch import collect_documents, read_questions, run_batch
    from fila_cli.qa.ray_batch import import_ray
    from fila_cli.qa.run import RecordSink, load_done

    all_questions = read_questions(questions, questions_file)
    documents = collect_documents(paths, recursive)
    if not documents:
        raise UsageError("no documents found in the given paths")
    check_resumable_output(output, resume, "records")
    if batch.ray_address is not None:
        import_ray()  # a missing extra is a usage error before anything else happens
    if server is not None and (batch.ray_address is not None or batch.parallel > 1):
        raise UsageError("--server sends the documents to a running fila serve: --ray and --parallel are its business")
    done = load_done(output, keep=_unchanged(documents)) if resume and output is not None else set()
    if batch.ray_address is not None and server is None:
        from fila_cli.cli.ray_driver import supervise

        drive = functools.partial(_drive_ray, documents, all_questions, output, done, batch, model, ask, verbose)
        return supervise(drive, functools.partial(_cluster_lost_line, output=output))
    with stop_signals() as stop:  # Ctrl-C or SIGTERM: the records in flight, the summary, then exit
        if server is not None:
            from fila_cli.cli.serve import run_remote_batch

            return _finish(run_remote_batch(server, documents, all_questions, ask, output, done,
                                            should_stop=stop.requested), stop)
        asker = load_asker(model, reuse_prefix=len(all_questions) > 1, n_seq_max=batch.parallel)

        sink = RecordSink(output)
        progress = Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=stderr, transient=True, disable=not stderr.is_terminal)
        try:
            with progress:
                task = progress.add_task("batch", total=len(documents) * len(all_questions))
                summary = run_batch(asker, documents, all_questions, ask, sink, batch, done=done,
                                    on_record=lambda: progress.advance(task), on_warning=warning_line,
                                    should_stop=stop.requested, on_notice=note_line)
        finally:
            sink.close()
        return _finish(summary, stop)


def _unchanged(documents: list[Path]) -> Callable[[dict[str, Any]], bool]:
    """--resume's test of a record: False when its document, one of this run's, has other bytes
    now (its records are dropped and it is answered again, with a warning per document)."""
    from fila_cli.qa.batch import sha256_or_none

    given = {str(file): file for file in documents}
    hashes: dict[str, str | None] = {}

    def keep(record: dict[str, Any]) -> bool:
        name = record.get("file")
        if name not in given:
            return True  # not this run's document: not this run's to judge
        if name not in hashes:
            hashes[name] = sha256_or_none(given[name])
            if hashes[name] is not None and hashes[name] != record.get("sha256"):
                warning_line(f"{name}: its bytes changed since it was answered; its earlier records are "
                             f"dropped and it is answered again")
        return hashes[name] is None or hashes[name] == record.get("sha256")

    return keep


def _finish(summary: BatchSummary, stop: StopRequest) -> int:
    stderr.print(f"fila batch: {summary.line()}", highlight=False, soft_wrap=True)  # one line, for scripts
    if summary.interrupted:
        return stop.exit_code
    return int(ExitCode.FAILURE) if summary.failed else int(ExitCode.OK)


def _drive_ray(documents: list[Path], questions: list[str], output: Path | None, done: set, batch: BatchOptions,
               model: ModelOptions, ask: AskOptions, verbose: bool, status: DriverStatus) -> int:
    """The Ray driver's process (cli/ray_driver.py): its own signals, its own one-line errors."""
    from fila_cli.cli.stopping import stop_signals

    try:
        with handle_errors(verbose), stop_signals() as stop:
            return _run_on_ray(documents, questions, output, done, batch, model, ask, stop, status)
    except typer.Exit as exit:
        return exit.exit_code


def _run_on_ray(documents: list[Path], questions: list[str], output: Path | None, done: set, batch: BatchOptions,
                model: ModelOptions, ask: AskOptions, stop: StopRequest, status: DriverStatus) -> int:
    """The batch on a Ray cluster: the driver hashes, skips what is done and writes every record."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fila_cli.qa.batch import sha256_or_none
    from fila_cli.qa.ray_batch import WorkItem, run_batch_on_ray
    from fila_cli.qa.run import BatchSummary, RecordSink, unit_key

    model_name = model.bundle().name  # the records' and --resume's name for the model
    items, skipped = [], 0
    for file in documents:
        sha256 = sha256_or_none(file)
        todo = [q for q in questions if unit_key(file, sha256, q, model_name) not in done]
        skipped += len(questions) - len(todo)
        if todo:
            items.append(WorkItem(str(file.resolve()), sha256, todo, name=str(file)))
    if not items:
        return _finish(BatchSummary(skipped=skipped), stop)
    status.total.value = sum(len(item.questions) for item in items)
    sink = _CountingSink(RecordSink(output), status)
    progress = Progress(TextColumn("answering on the cluster"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=stderr, transient=True, disable=not stderr.is_terminal)
    try:
        with progress:
            task = progress.add_task("ray", total=sum(len(item.questions) for item in items), rate="starting workers…")

            def on_record(cluster) -> None:
                progress.update(task, advance=1, rate=f"{cluster.pages_per_minute():.1f} pages/min · "
                                                      f"{len(cluster.workers or ())} workers")

            try:
                summary = run_batch_on_ray(items, model, ask, sink, batch, model_name=model_name, on_record=on_record,
                                           on_message=lambda m: progress.console.print(m, highlight=False, markup=False),
                                           on_warning=warning_line, should_stop=stop.requested)
            except (Exception, SystemExit) as error:  # Ray's driver code may sys.exit when its node dies
                if isinstance(error, FilaError) or not _is_cluster_failure(error):
                    raise
                cause = (str(error).strip().splitlines() or [""])[0][:200]
                raise FilaError(_cluster_lost_line(status.missing(), status.total.value,
                                                   type(error).__name__ + (": " + cause if cause else ""),
                                                   output=output)) from None
    finally:
        sink.close()
    summary.skipped = skipped
    return _finish(summary, stop)


class _CountingSink:
    """The record sink, counting in the driver's shared status what it wrote: what a lost cluster
    left undone, known to the supervising process even when Ray ends this one."""

    def __init__(self, sink, status: DriverStatus) -> None:
        self.sink, self.status = sink, status

    def write(self, record: dict[str, Any]) -> None:
        self.sink.write(record)
        self.status.written.value += 1

    def close(self) -> None:
        self.sink.close()


def _is_cluster_failure(error: BaseException) -> bool:
    """An error of Ray itself (its node's agent killed, the machine lost, the connection gone)."""
    return (type(error).__module__.split(".")[0] == "ray" or isinstance(error, (ConnectionError, SystemExit)))


def _cluster_lost_line(missing: int, total: int, cause: str, *, output: Path | None) -> str:
    """One line: what failed, what is missing, and the command that finishes the job."""
    import shlex
    import sys

    from fila_cli.cli.ray_driver import UNKNOWN

    counted = "no record written" if total == UNKNOWN else f"{missing} of {total} records not written"
    what = f"the Ray cluster was lost, or the driver killed ({cause}); {counted}"
    if output is None:
        return f"{what}; run again with -o FILE to be able to --resume"
    argv = ["fila", *sys.argv[1:]]
    resume = " ".join(shlex.quote(arg) for arg in argv) + ("" if "--resume" in argv else " --resume")
    return f"{what}; finish them with: {resume}"
