"""From predictions to scores: the task's metric per question, averaged, overall and per group.

Every readable example counts: a question with no prediction, or whose prediction failed, scores
0 (and is counted as missing or failed), so a partial run cannot look better than it is.
Predictions are JSON lines with at least ``question_id`` and ``answer`` (``fila eval -o`` writes
them; another tool's output can be scored the same way).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fila_cli.errors import UsageError
from fila_cli.eval.datasets import BadRows, EvalExample
from fila_cli.eval.evidence_split import PLACEMENTS
from fila_cli.eval.tasks import TaskSpec


@dataclass
class GroupScore:
    score: float
    questions: int


@dataclass
class TaskScores:
    task: str
    metric: str
    score: float | None  # mean over the examples; None when there are none
    questions: int
    answered: int
    failed: int  # predictions recorded with an error
    missing: int  # examples with no prediction at all
    bad_rows: dict[str, int] = field(default_factory=dict)
    groups: dict[str, GroupScore] = field(default_factory=dict)
    model: str | None = None
    # By where the gold answer lies on the page ("inside" one crop, "straddling" a boundary), for
    # the questions whose gold answer was located (``evidence_split``); the rest are "not located".
    evidence: dict[str, GroupScore] = field(default_factory=dict)
    not_located: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task, "metric": self.metric, "score": _rounded(self.score), "questions": self.questions,
            "answered": self.answered, "failed": self.failed, "missing": self.missing,
            "bad_rows": dict(sorted(self.bad_rows.items())), "model": self.model,
            "groups": {name: {"score": _rounded(g.score), "questions": g.questions} for name, g in sorted(self.groups.items())},
            "evidence": {name: {"score": _rounded(g.score), "questions": g.questions} for name, g in sorted(self.evidence.items())},
            "evidence_not_located": self.not_located,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


@dataclass(frozen=True)
class Prediction:
    answer: str | None  # None: the question failed (``error`` says why)
    error: str | None = None
    evidence: str | None = None  # where the gold answer lies: "inside", "straddling", or None (not located)


def score_predictions(task: TaskSpec, examples: Iterable[EvalExample], predictions: dict[str, Prediction],
                      bad: BadRows | None = None, model: str | None = None) -> TaskScores:
    per_group: dict[str, list[float]] = {}
    per_placement: dict[str, list[float]] = {}
    values: list[float] = []
    answered = failed = missing = 0
    for example in examples:
        prediction = predictions.get(example.question_id)
        if prediction is None:
            missing += 1
            value = 0.0
        elif prediction.answer is None:
            failed += 1
            value = 0.0
        else:
            answered += 1
            value = task.metric(prediction.answer, example.answers)
        values.append(value)
        if example.group is not None:
            per_group.setdefault(example.group, []).append(value)
        if prediction is not None and prediction.evidence is not None:
            per_placement.setdefault(prediction.evidence, []).append(value)
    groups = {name: GroupScore(sum(v) / len(v), len(v)) for name, v in per_group.items()}
    placements = {name: GroupScore(sum(v) / len(v), len(v)) for name, v in per_placement.items()}
    return TaskScores(task.name, task.metric_name, sum(values) / len(values) if values else None, len(values),
                      answered, failed, missing, dict(bad.counts) if bad else {}, groups, model, placements,
                      len(values) - sum(len(v) for v in per_placement.values()))


def read_predictions(path: Path, *, model: str | None = None, task: str | None = None) -> dict[str, Prediction]:
    """``question_id`` -> prediction from a JSON-lines file; an answered record wins over a failed one.

    ``model``/``task``: keep only records of that model and task (records without the key are kept).
    """
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # \n only: a record may hold U+2028 raw
    except FileNotFoundError:
        raise UsageError(f"{path}: no such predictions file; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read the predictions ({error}); check the file") from None
    predictions: dict[str, Prediction] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if not isinstance(record, dict) or record.get("question_id") is None:
            continue
        if (model is not None and record.get("model", model) != model) or (task is not None and record.get("task", task) != task):
            continue
        question_id = str(record["question_id"])
        answer = record.get("answer")
        evidence = record.get("gold_evidence") if record.get("gold_evidence") in PLACEMENTS else None
        if isinstance(answer, str) and record.get("error") is None:
            predictions[question_id] = Prediction(answer, evidence=evidence)
        elif question_id not in predictions or predictions[question_id].answer is None:
            error = record.get("error")
            predictions[question_id] = Prediction(None, error.get("message") if isinstance(error, dict) else str(error), evidence)
    return predictions
