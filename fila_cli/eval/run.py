"""``fila eval``'s run: every question through the real ``Asker``, one prediction record each.

Records are written and flushed one by one (``RecordSink``, as ``fila batch``): a kill loses at
most the record in flight, and ``--resume`` skips the (task, question id, model) triples the file
already answered, retrying failed ones, without writing a duplicate. Ctrl-C stops after the
question in flight: the caller's ``should_stop`` says when (the CLI sets it on Ctrl-C or SIGTERM);
the run installs no signal handler, so it runs in any thread.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fila_cli.errors import FilaError
from fila_cli.eval.datasets import EvalExample
from fila_cli.eval.evidence_split import GoldLocator
from fila_cli.eval.scores import Prediction
from fila_cli.eval.tasks import TaskSpec
from fila_cli.qa.ask import Asker
from fila_cli.qa.options import AskOptions
from fila_cli.qa.records import rounded_confidence
from fila_cli.qa.run import RecordSink, StopCheck, never_stop
from fila_cli.vision.token_cache import CachedPage

# Pages whose visual tokens a run keeps in memory: benchmarks ask several questions about one image,
# often close together, and a 7B model's page is ~50 MB of tokens, so a few pages are enough.
RECENT_PAGES = 4


class RecentPages:
    """The visual tokens of the last few pages, in memory: the token cache a benchmark run uses by
    default (on disk, a split's thousands of pages would take tens of GB). A ``KeyedCache[CachedPage]``, as TokenCache."""

    def __init__(self, capacity: int = RECENT_PAGES):
        self.capacity = capacity
        self._pages: OrderedDict[str, CachedPage] = OrderedDict()

    def get(self, key: str) -> CachedPage | None:
        cached = self._pages.get(key)
        if cached is not None:
            self._pages.move_to_end(key)
        return cached

    def put(self, key: str, value: CachedPage) -> None:
        self._pages[key] = value
        self._pages.move_to_end(key)
        while len(self._pages) > self.capacity:
            self._pages.popitem(last=False)

    def discard(self, key: str) -> None:
        self._pages.pop(key, None)


def prediction_key(record: dict[str, Any]) -> tuple[str, str, str]:
    """The unit of work of a prediction record: (task, question id, model)."""
    return str(record.get("task", "")), str(record.get("question_id", "")), str(record.get("model", ""))


@dataclass
class EvalRun:
    """What a run did, and every example it saw (without image bytes), for scoring."""

    examples: list[EvalExample] = field(default_factory=list)
    predictions: dict[str, Prediction] = field(default_factory=dict)
    answered: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output (--resume)
    interrupted: bool = False


def run_eval(asker: Asker, task: TaskSpec, examples: Iterable[EvalExample], sink: RecordSink | None,
             options: AskOptions, *, done: dict[str, Prediction] | None = None,
             on_record: Callable[[], None] | None = None, should_stop: StopCheck = never_stop,
             gold_ocr: bool = False) -> EvalRun:
    """Answer each example not in ``done`` (question id -> prediction already recorded), until
    ``should_stop`` says so (checked between questions).

    ``gold_ocr``: locate gold answers on pages without a text layer by OCR (``eval.evidence_split``)."""
    run = EvalRun()
    done = done or {}
    gold = GoldLocator(asker.encoder.anyres, ocr=gold_ocr)
    with tempfile.TemporaryDirectory(prefix="fila-eval-") as scratch:
        for example in examples:
            if should_stop():
                run.interrupted = True
                break
            run.examples.append(example.without_image())
            if example.question_id in done:
                run.skipped += 1
                run.predictions[example.question_id] = done[example.question_id]
            else:
                record = answer_example(asker, task, example, options, Path(scratch), gold=gold)
                if sink is not None:
                    sink.write(record)
                if record["error"] is None:
                    run.answered += 1
                    run.predictions[example.question_id] = Prediction(record["answer"], evidence=record["gold_evidence"])
                else:
                    run.failed += 1
                    run.predictions[example.question_id] = Prediction(None, record["error"]["message"], record["gold_evidence"])
            if on_record is not None:
                on_record()
    return run


def answer_example(asker: Asker, task: TaskSpec, example: EvalExample, options: AskOptions, scratch: Path,
                   *, gold: GoldLocator | None = None) -> dict[str, Any]:
    """One prediction record: the answer and its score, or the error that stopped it; ``gold_evidence``,
    where the gold answer lies (``eval.evidence_split``)."""
    gold = gold or GoldLocator(asker.encoder.anyres)
    image = _image_file(example, scratch)
    record: dict[str, Any] = {"task": task.name, "question_id": example.question_id, "question": example.question,
                              "model": asker.model_name, "group": example.group,
                              "gold_evidence": gold.placement(image, example.answers)}
    try:
        answer = asker.ask(image, task.prompt(example.question), options)
    except FilaError as error:
        return {**record, **_no_answer(), "error": {"kind": error.kind, "message": _named(example, str(error))}}
    except Exception as error:  # one bad image must never end the run
        message = _named(example, f"unexpected {type(error).__name__}: {error}")
        return {**record, **_no_answer(), "error": {"kind": "error", "message": message}}
    return {**record, "answer": answer.answer, "score": round(task.metric(answer.answer, example.answers), 6),
            "confidence": rounded_confidence(answer.confidence),
            "timings": {k: round(v, 4) for k, v in answer.timings.to_json().items()}, "error": None}


def _no_answer() -> dict[str, Any]:
    return {"answer": None, "score": None, "confidence": None, "timings": None}


def _image_file(example: EvalExample, scratch: Path) -> Path:
    """The example's image as a file the document reader opens (bytes are written to scratch)."""
    if example.image_bytes:
        path = scratch / "image"
        path.write_bytes(example.image_bytes)
        return path
    assert example.image_path is not None
    return example.image_path


def _named(example: EvalExample, message: str) -> str:
    """Error messages name the question, not the scratch file its image was written to."""
    return f"question {example.question_id}: {message}"
