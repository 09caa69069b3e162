"""`fila eval`: run a benchmark, re-score predictions, make the fragmentation benchmark.

stdout holds the result, the score table, or with ``--json`` one JSON object and nothing else;
progress, the model's loading and the summary line go to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fila_cli.cli.help_format import PlainHelpGroup
from fila_cli.cli.options import CommandOptions, VisionMmprojOption, load_asker, model_command
from fila_cli.cli.support import EXIT_CODES_HELP, QuietVerboseOption, handle_errors, stderr
from fila_cli.errors import ExitCode, UsageError
from fila_cli.llm.sampling import SamplingParams
from fila_cli.qa.options import ModelOptions

# Benchmark answers are a word or a phrase; a longer generation only costs time.
EVAL_MAX_TOKENS = 32

eval_app = typer.Typer(rich_markup_mode=None, cls=PlainHelpGroup,
    name="eval",
    help="Score a model on DocVQA, InfoVQA, TextVQA, ChartQA or the fragmentation benchmark.",
    invoke_without_command=True,
    no_args_is_help=True,
    add_completion=False,
)

TaskOption = Annotated[str | None, typer.Option("--task", "-t", help="docvqa, infovqa, textvqa, chartqa or fragmentation.", show_default=False)]
DataOption = Annotated[Path | None, typer.Option("--data", "-d", help="The split: a parquet file, a folder of lmms-eval parquet shards, or a JSON/JSONL file.", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the scores as one JSON object on stdout instead of a table (the default when stdout is not a terminal).")]


@eval_app.callback()
@model_command(document=False, compile_option=True, cache_default=False, max_tokens=EVAL_MAX_TOKENS)
def eval_command(
    ctx: typer.Context,
    task: TaskOption = None,
    data: DataOption = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", help="Only the first N rows of the data.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write one prediction per question to this JSON-lines file.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUTPUT: skip the questions it already answered for this model.")] = False,
    as_json: JsonOption = False,
    gold_ocr: Annotated[bool, typer.Option("--gold-ocr", help="Locate gold answers on pages without a text layer by OCR (needs Tesseract), for the accuracy split by crop boundaries.")] = False,
    *,
    options: CommandOptions,
) -> None:
    """Answer every question of a benchmark split and score the answers with the task's official metric.

    `fila eval --task docvqa --data DocVQA/ -o predictions.jsonl` asks each question with the prompt
    suffix "Answer the question using a single word or phrase.", writes one JSON line per question
    ({"task", "question_id", "question", "model", "group", "gold_evidence", "answer", "score", "confidence",
    "timings", "error"}), and prints the scores: ANLS (docvqa, infovqa), VQA accuracy (textvqa), relaxed accuracy
    (chartqa), exact match per placement (fragmentation). Every task's score is also split by where the gold
    answer lies on the page (gold_evidence: "inside" one crop or "straddling" a crop boundary of this model's
    canvas; located in the text layer, or by OCR with --gold-ocr). Exit 0 when every question was answered, 1 when
    some failed, 130 on Ctrl-C, 143 on SIGTERM (`--resume` continues).
    """
    if ctx.invoked_subcommand is not None:
        return
    with handle_errors(options.verbose):
        if task is None or data is None:
            raise UsageError("pass --task and --data (see `fila eval --help`)")
        raise typer.Exit(run_eval_command(
            task, data, limit=limit, output=output, resume=resume, as_json=as_json,
            model=options.model(), sampling=options.sampling(), gold_ocr=gold_ocr))


def run_eval_command(task: str, data: Path, *, limit: int | None, output: Path | None, resume: bool, as_json: bool,
                     model: ModelOptions, sampling: SamplingParams, gold_ocr: bool = False) -> int:
    from fila_cli.eval.datasets import BadRows, count_rows, data_files, read_examples
    from fila_cli.eval.scores import read_predictions, score_predictions
    from fila_cli.eval.tasks import task_spec
    from fila_cli.qa.options import AskOptions

    spec = task_spec(task)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    from fila_cli.cli.support import check_resumable_output

    check_resumable_output(output, resume, "predictions")
    files = data_files(data)
    total = count_rows(files) if limit is None else min(limit, count_rows(files))
    # The model code (torch, llama.cpp) loads only once the command line is known to be good.
    from fila_cli.cli.stopping import stop_signals
    from fila_cli.eval.run import RecentPages, prediction_key, run_eval
    from fila_cli.qa.run import RecordSink, load_done

    asker = load_asker(model)
    # No LLM prefix states on disk for a benchmark: thousands of pages asked about once each would write
    # hundreds of MB apiece (and evict a user's own) for no reuse.
    asker.prefix_store = None
    if asker.token_cache is None:
        asker.token_cache = RecentPages()
    if spec.name == "fragmentation":
        _check_fragmentation_canvases(files[0], asker.encoder.anyres)
    done = {}
    if resume and output is not None and output.exists():
        load_done(output, key=prediction_key)  # cuts a torn line, drops failed records
        done = read_predictions(output, model=asker.model_name, task=spec.name)
    bad = BadRows()
    examples = read_examples(spec, files, bad, limit=limit)
    sink = RecordSink(output) if output is not None else None
    progress = Progress(TextColumn(f"{spec.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=stderr, transient=True, disable=not stderr.is_terminal)
    try:
        with progress, stop_signals() as stop:  # Ctrl-C or SIGTERM: the question in flight, the scores, then exit
            bar = progress.add_task("eval", total=total)
            run = run_eval(asker, spec, examples, sink, AskOptions(sampling=sampling), done=done,
                           on_record=lambda: progress.advance(bar), should_stop=stop.requested, gold_ocr=gold_ocr)
            progress.update(bar, completed=total)
    finally:
        if sink is not None:
            sink.close()
    scores = score_predictions(spec, run.examples, run.predictions, bad, asker.model_name)
    summary = f"{run.answered} answered, {run.failed} failed"
    if run.skipped:
        summary += f", {run.skipped} already done (--resume)"
    if bad.total:
        summary += f", {bad.total} bad rows skipped"
    as_json = json_output(as_json)
    if as_json:  # the table says it all on a terminal; beside JSON, one line on stderr
        stderr.print(f"fila eval: {'interrupted: ' if run.interrupted else ''}{summary}", highlight=False, soft_wrap=True)
    extra = ([f"{run.skipped} already done (--resume)"] if run.skipped else []) + (["interrupted"] if run.interrupted else [])
    print_scores(scores, as_json, extra)
    if run.interrupted:
        return stop.exit_code
    return int(ExitCode.FAILURE) if run.failed else int(ExitCode.OK)


def _check_fragmentation_canvases(data_file: Path, anyres) -> None:
    """Warn when the pages were made for other canvases: "straddling" would not be true for this model."""
    from fila_cli.eval.fragmentation import generator_config

    made_for = generator_config(data_file)
    if made_for is not None and (made_for.crop_size, made_for.image_grid_pinpoints) != (anyres.crop_size, anyres.image_grid_pinpoints):
        stderr.print(f"fila eval: warning: {data_file.parent} was made for other canvases than this model's; "
                     "its inside/straddling labels do not hold for it (remake it with `fila eval make-fragmentation --model`)",
                     highlight=False, soft_wrap=True)


@eval_app.command("score", epilog=EXIT_CODES_HELP, short_help="Score a predictions file without running a model.")
def score_command(
    task: TaskOption = None,
    data: DataOption = None,
    predictions: Annotated[Path | None, typer.Option("--predictions", "-p", help="JSON lines with question_id and answer.", show_default=False)] = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", help="Only the first N rows of the data.")] = None,
    as_json: JsonOption = False,
    verbose: QuietVerboseOption = False,
) -> None:
    """Score a predictions file without running a model (re-score, or compare another tool's output).

    Questions of the data with no prediction score 0 and are counted as missing.
    """
    with handle_errors(verbose):
        from fila_cli.eval.datasets import BadRows, data_files, read_examples
        from fila_cli.eval.scores import read_predictions, score_predictions
        from fila_cli.eval.tasks import task_spec

        if task is None or data is None or predictions is None:
            raise UsageError("pass --task, --data and --predictions (see `fila eval score --help`)")
        spec = task_spec(task)
        found = read_predictions(predictions, task=spec.name)
        bad = BadRows()
        with stderr.status("reading the data…"):
            examples = list(read_examples(spec, data_files(data), bad, limit=limit, load_images=False))
        print_scores(score_predictions(spec, examples, found, bad), json_output(as_json))


def json_output(as_json: bool) -> bool:
    """Scores as JSON with --json, or when stdout is not a terminal (as ask and batch)."""
    import sys

    return as_json or not sys.stdout.isatty()


def print_scores(scores, as_json: bool, extra: list[str] | None = None) -> None:
    """The scores on stdout: one JSON object, or a table and one line of notes."""
    if as_json:
        print(json.dumps(scores.to_json()), flush=True)
        return
    table = Table(title=f"fila eval: {scores.task}" + (f" ({scores.model})" if scores.model else ""), title_justify="left")
    table.add_column("", style="bold")
    table.add_column(scores.metric, justify="right")
    table.add_column("questions", justify="right")
    table.add_row("all", _percent(scores.score), str(scores.questions))
    for name, group in sorted(scores.groups.items()):
        table.add_row(name, _percent(group.score), str(group.questions))
    for name, group in sorted(scores.evidence.items()):  # where the gold answer lies on the page
        table.add_row(EVIDENCE_ROWS.get(name, name), _percent(group.score), str(group.questions))
    console = Console(highlight=False)
    console.print(table)
    notes = [f"{scores.answered} answered", f"{scores.failed} failed", f"{scores.missing} without a prediction"]
    if scores.evidence:
        notes.append(f"gold answer not located on {scores.not_located}")
    if scores.bad_rows:
        notes.append("bad rows: " + ", ".join(f"{reason} {n}" for reason, n in sorted(scores.bad_rows.items())))
    console.print("; ".join(notes + (extra or [])))


# Table rows of the accuracy split by where the gold answer lies (``eval.evidence_split``).
EVIDENCE_ROWS = {"inside": "gold inside one crop", "straddling": "gold across a crop boundary"}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


# A few hundred questions per placement make the inside/straddling difference visible over noise.
DEFAULT_FRAGMENTATION_PAGES = 200


@eval_app.command("make-fragmentation", epilog=EXIT_CODES_HELP, short_help="Make the fragmentation benchmark.")
def make_fragmentation_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the pages and fragmentation.jsonl into.", show_default=False)],
    n: Annotated[int, typer.Option("--n", help="Pages to make, one question each, inside and straddling alternating.")] = DEFAULT_FRAGMENTATION_PAGES,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed makes the same pages.")] = 0,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Take the canvases from this bundle's vision weights (default: the paper's five canvases, as LLaVA-1.6).")] = None,
    mmproj: VisionMmprojOption = None,
    verbose: QuietVerboseOption = False,
) -> None:
    """Make the fragmentation benchmark: pages whose answer is inside one crop or cut by a crop boundary.

    Writes OUT_DIR/pages/NNNN.pdf (invoice-, table- and form-like pages, varied shapes, fonts and sizes),
    OUT_DIR/fragmentation.jsonl (question_id, question, answers, image, placement "inside" or "straddling",
    cut, kind, the answer's box in points and on the canvas, canvas, grid, font) and OUT_DIR/generator.json.
    The boundaries are those of the canvas fila picks for each page. Score a model with
    `fila eval --task fragmentation --data OUT_DIR/fragmentation.jsonl`.
    """
    with handle_errors(verbose):
        from fila_cli.config import AnyresConfig
        from fila_cli.eval.fragmentation import DATA_FILE, make_fragmentation

        config = AnyresConfig()
        if model is not None or mmproj is not None:
            from fila_cli.bundles.bundle import resolve_bundle
            from fila_cli.vision.load import load_vision_weights

            weights = load_vision_weights(mmproj if mmproj is not None else resolve_bundle(model).vision)
            config = AnyresConfig(crop_size=weights.clip_config.image_size, image_grid_pinpoints=weights.image_grid_pinpoints)
        progress = Progress(TextColumn("making pages"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=stderr, transient=True, disable=not stderr.is_terminal)
        with progress:
            bar = progress.add_task("pages", total=n)
            rows = make_fragmentation(out_dir, n, seed, config, on_page=lambda done, _: progress.update(bar, completed=done))
        straddling = sum(row.placement == "straddling" for row in rows)
        stderr.print(f"{out_dir / DATA_FILE}: {len(rows)} questions, {len(rows) - straddling} inside one crop, "
                     f"{straddling} straddling a crop boundary", highlight=False, soft_wrap=True)
