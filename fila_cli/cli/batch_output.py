"""`fila batch` as a script sees it: JSON lines on stdout or in a file, progress and summary on stderr."""

from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fila_cli.cli.options import load_asker
from fila_cli.cli.support import stderr, warning_line
from fila_cli.errors import ExitCode, UsageError
from fila_cli.qa.batch import (
    BatchSummary,
    RecordSink,
    check_parallel,
    collect_documents,
    load_done,
    read_questions,
    run_batch,
    sha256_or_none,
)
from fila_cli.qa.options import AskOptions, ModelOptions
from fila_cli.qa.ray_batch import import_ray


def run_batch_command(paths: list[str], *, questions: list[str], questions_file: Path | None, recursive: bool,
                      output: Path | None, resume: bool, timeout: float, model: ModelOptions, ask: AskOptions,
                      ray_address: str | None = None, ray_cpus: float = 2.0,
                      pipeline_depth: int | None = None, parallel: int = 1, server: str | None = None) -> int:
    all_questions = read_questions(questions, questions_file)
    documents = collect_documents(paths, recursive)
    if not documents:
        raise UsageError("no documents found in the given paths")
    if timeout <= 0:
        raise UsageError(f"--timeout must be positive (got {timeout:g})")
    if resume and output is None:
        raise UsageError("--resume needs --output FILE: the records to continue")
    if output is not None and not resume and output.exists() and output.stat().st_size > 0:
        raise UsageError(f"{output} already holds records: pass --resume to continue it, or choose another file")
    pipeline_depth = check_parallel(parallel, pipeline_depth, n_seq_max=parallel)
    if ray_address is not None and parallel > 1:
        raise UsageError("--parallel is for one machine's batch; with --ray each worker answers one document at a time")
    if ray_address is not None and ray_cpus <= 0:
        raise UsageError(f"--ray-cpus must be positive (got {ray_cpus:g})")
    if ray_address is not None:
        import_ray()  # a missing extra is a usage error before anything else happens
    if server is not None and (ray_address is not None or parallel > 1):
        raise UsageError("--server sends the documents to a running fila serve: --ray and --parallel are its business")
    done = load_done(output) if resume and output is not None else set()
    if server is not None:
        from fila_cli.cli.serve import run_remote_batch

        return _finish(run_remote_batch(server, documents, all_questions, ask, output, done))
    if ray_address is not None:
        return _run_on_ray(documents, all_questions, output, done, timeout, model, ask, ray_address, ray_cpus,
                           pipeline_depth)
    asker = load_asker(model, reuse_prefix=len(all_questions) > 1, n_seq_max=parallel)

    sink = RecordSink(output)
    progress = Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=stderr, transient=True)
    try:
        with progress:
            task = progress.add_task("batch", total=len(documents) * len(all_questions))
            summary = run_batch(asker, documents, all_questions, ask, sink, timeout_s=timeout, done=done,
                                on_record=lambda: progress.advance(task), on_warning=warning_line,
                                pipeline_depth=pipeline_depth, parallel=parallel)
    finally:
        sink.close()
    return _finish(summary)


def _finish(summary: BatchSummary) -> int:
    stderr.print(f"fila batch: {summary.line()}", highlight=False, soft_wrap=True)  # one line, for scripts
    if summary.interrupted:
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.FAILURE) if summary.failed else int(ExitCode.OK)


def _run_on_ray(documents: list[Path], questions: list[str], output: Path | None, done: set, timeout: float,
                model: ModelOptions, ask: AskOptions, address: str, cpus_per_actor: float, pipeline_depth: int) -> int:
    """The batch on a Ray cluster: the driver hashes, skips what is done and writes every record."""
    from fila_cli.qa.ray_batch import WorkItem, run_batch_on_ray

    model_name = model.bundle().name  # the records' and --resume's name for the model
    items, skipped = [], 0
    for file in documents:
        sha256 = sha256_or_none(file)
        todo = [q for q in questions if (sha256, q, model_name) not in done]
        skipped += len(questions) - len(todo)
        if todo:
            items.append(WorkItem(str(file.resolve()), sha256, todo, name=str(file)))
    if not items:
        return _finish(BatchSummary(skipped=skipped))
    sink = RecordSink(output)
    progress = Progress(TextColumn("answering on the cluster"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=stderr, transient=True)
    try:
        with progress:
            task = progress.add_task("ray", total=sum(len(item.questions) for item in items), rate="starting workers…")

            def on_record(cluster) -> None:
                progress.update(task, advance=1, rate=f"{cluster.pages_per_minute():.1f} pages/min · "
                                                      f"{len(cluster.workers or ())} workers")

            summary = run_batch_on_ray(items, model, ask, sink, address=address, model_name=model_name,
                                       timeout_s=timeout, actors=None, cpus_per_actor=cpus_per_actor,
                                       pipeline_depth=pipeline_depth,
                                       on_record=on_record, on_message=lambda m: progress.console.print(m, highlight=False, markup=False),
                                       on_warning=warning_line)
    finally:
        sink.close()
    summary.skipped = skipped
    return _finish(summary)
