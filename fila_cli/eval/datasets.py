"""Reading evaluation data: lmms-eval's parquet shards, or JSON / JSON-lines with the same keys.

``--data`` is a parquet file, a folder of shards (every ``*.parquet`` under it, in name order), a
glob, or one ``.json`` (a list of rows, or ``{"data": [...]}`` as the challenges publish them) or
``.jsonl`` file (a folder without parquet: its JSON-lines file). Images are what ``datasets`` writes for an ``Image`` feature, a ``{bytes, path}``
struct, or a path; in JSON, ``bytes`` is base64 and a path is relative to the JSON file.

A row that cannot be asked (no image, an empty question, no gold answer, a repeated question id,
an unreadable line) is counted under its reason and skipped, never fatal. Rows stream batch by
batch, so a 2.5 GB split is never held in memory.
"""

from __future__ import annotations

import base64
import binascii
import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fila_cli.bundles.bundle import stays_inside
from fila_cli.errors import UsageError
from fila_cli.eval.tasks import TaskSpec

PARQUET_SUFFIX = ".parquet"
JSON_SUFFIXES = (".json", ".jsonl")
_GLOB_CHARACTERS = set("*?[")
# How the hub names parquet shards: SPLIT-00000-of-00004.parquet
SHARD_NAME = re.compile(r"^([A-Za-z0-9_.]+?)-\d{5}-of-\d{5}\.parquet$")
# Rows read from parquet at a time: a few dozen document images, so memory stays small.
PARQUET_BATCH_ROWS = 32


@dataclass(frozen=True)
class EvalExample:
    question_id: str
    question: str
    answers: list[str]
    image_bytes: bytes | None  # the encoded image (PNG, JPEG...), or
    image_path: Path | None  # a file (an image, or a PDF for the fragmentation benchmark)
    group: str | None = None  # the task's group column (ChartQA's type, fragmentation's placement)

    def without_image(self) -> EvalExample:
        return EvalExample(self.question_id, self.question, self.answers, None, self.image_path, self.group)


@dataclass
class BadRows:
    """Rows skipped, by reason."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def data_files(data: str | Path) -> list[Path]:
    """The files ``--data`` names: parquet shards in name order, or one JSON file."""
    path = Path(data)
    if path.is_dir():
        files = sorted(path.rglob(f"*{PARQUET_SUFFIX}"))
        if not files:  # JSON lines first: a folder may also hold a JSON settings file beside them
            files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl") or sorted(p for p in path.iterdir() if p.suffix == ".json")
    elif not path.exists() and _GLOB_CHARACTERS & set(str(data)):
        files = sorted(Path(p) for p in glob.glob(str(data)) if Path(p).is_file())
    elif path.exists():
        files = [path]
    else:
        raise UsageError(f"{data}: no such file or folder; pass --data a parquet file, a folder of shards, or a JSON file")
    if not files:
        raise UsageError(f"{data}: no .parquet, .json or .jsonl files there; pass --data the split's shards")
    json_files = [f for f in files if f.suffix in JSON_SUFFIXES]
    if json_files and (len(files) > 1):
        raise UsageError(f"{data}: holds several JSON files or JSON beside parquet; pass --data one of them")
    unknown = [f for f in files if f.suffix not in JSON_SUFFIXES + (PARQUET_SUFFIX,)]
    if unknown:
        raise UsageError(f"{unknown[0]}: not a .parquet, .json or .jsonl file; pass --data the split's shards")
    _check_one_split(data, files)
    return files


def _check_one_split(data: str | Path, files: list[Path]) -> None:
    """A hub download holds several splits (and lmms-lab/DocVQA two datasets): refuse to mix them."""
    splits = sorted({(f.parent, match.group(1)) for f in files if (match := SHARD_NAME.match(f.name))})
    if len(splits) > 1:
        names = ", ".join(f"{folder.name}/{split}" if len({p for p, _ in splits}) > 1 else split for folder, split in splits)
        folder, split = next(((p, s) for p, s in splits if s == "validation"), splits[0])
        raise UsageError(f"{data}: holds shards of several splits ({names}); pass one, e.g. --data '{folder}/{split}-*.parquet'")


def count_rows(files: list[Path]) -> int:
    """How many rows the data holds (parquet: from the footers, without reading any image)."""
    total = 0
    for file in files:
        if file.suffix == PARQUET_SUFFIX:
            total += _parquet_file(file).metadata.num_rows
        else:
            total += sum(1 for _ in _json_rows(file))
    return total


def read_examples(task: TaskSpec, files: list[Path], bad: BadRows, *, limit: int | None = None,
                  load_images: bool = True) -> Iterator[EvalExample]:
    """The examples of the first ``limit`` rows (all rows when None), bad rows counted in ``bad``.

    ``load_images=False`` keeps only where the image is (its presence is still checked), for
    scoring without a model.
    """
    seen: set[str] = set()
    for index, (row, source) in enumerate(_rows(task, files)):
        if limit is not None and index >= limit:
            return
        example = _example(task, row, index, source, load_images, bad)
        if example is None:
            continue
        if example.question_id in seen:
            bad.add("repeated question id")
            continue
        seen.add(example.question_id)
        yield example


def _rows(task: TaskSpec, files: list[Path]) -> Iterator[tuple[dict[str, Any] | None, Path]]:
    for file in files:
        if file.suffix == PARQUET_SUFFIX:
            yield from ((row, file) for row in _parquet_rows(task, file))
        else:
            yield from ((row, file) for row in _json_rows(file))


def _parquet_file(file: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except (OSError, ValueError) as error:  # pyarrow raises ArrowInvalid (a ValueError) for non-parquet
        raise UsageError(f"{file}: not a readable parquet file ({error}); download the shard again") from None


def _parquet_rows(task: TaskSpec, file: Path) -> Iterator[dict[str, Any]]:
    parquet = _parquet_file(file)
    present = set(parquet.schema_arrow.names)
    wanted = [task.question_column, task.answers_column, task.image_column]
    wanted += [c for c in (task.id_column, task.group_column) if c is not None]
    missing = [c for c in wanted if c not in present]
    if missing:
        raise UsageError(f"{file}: no column {', '.join(repr(c) for c in missing)} (it has {', '.join(sorted(present))}); "
                         f"is it lmms-eval's data for {task.name}?")
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        yield from batch.to_pylist()


def _json_rows(file: Path) -> Iterator[dict[str, Any] | None]:
    """Rows of a JSON or JSON-lines file; None for a line that is not a JSON object."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{file}: cannot read it ({error}); check the file") from None
    if file.suffix == ".jsonl":
        for line in text.split("\n"):  # \n only: a row may hold U+2028 raw
            if line.strip():
                yield _object_or_none(line)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{file}: not valid JSON ({error.msg}, line {error.lineno}); fix or regenerate it") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UsageError(f"{file}: expected a list of rows (or {{\"data\": [...]}}); regenerate it")
    for row in data:
        yield row if isinstance(row, dict) else None


def _object_or_none(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _example(task: TaskSpec, row: dict[str, Any] | None, index: int, source: Path, load_images: bool,
             bad: BadRows) -> EvalExample | None:
    if row is None:
        bad.add("unreadable row")
        return None
    question = row.get(task.question_column)
    if not isinstance(question, str) or not question.strip():
        bad.add("empty question")
        return None
    answers = _answers(row.get(task.answers_column))
    if not answers:
        bad.add("no gold answer")
        return None
    image_bytes, image_path = _image(row.get(task.image_column), source)
    if image_path == _OUTSIDE:
        bad.add("image path outside the data folder")
        return None
    if image_bytes is None and image_path is None:
        bad.add("missing image")
        return None
    raw_id = row.get(task.id_column) if task.id_column is not None else index
    if raw_id is None or str(raw_id).strip() == "":
        bad.add("missing question id")
        return None
    group = row.get(task.group_column) if task.group_column is not None else None
    return EvalExample(str(raw_id), question.strip(), answers, image_bytes if load_images else None, image_path,
                       None if group is None else str(group))


def _answers(value: Any) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None and str(v).strip()]


def _image(value: Any, source: Path) -> tuple[bytes | None, Path | None]:
    """(bytes, path) of the row's image; both None when it has none that can be read."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None, None
    if isinstance(value, str):
        return None, _existing(source.parent, value)
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, (bytes, bytearray)) and data:
            return bytes(data), None
        if isinstance(data, str) and data:  # base64, in JSON
            try:
                decoded = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            if decoded:
                return decoded, None
        if isinstance(value.get("path"), str) and value["path"]:
            return None, _existing(source.parent, value["path"])
    return None, None


# A row's image path is relative to its data file's folder and stays in it (no absolute path, no
# ".."): a dataset from elsewhere must not make fila read any file it names.
_OUTSIDE = Path("/dev/null/outside")


def _existing(folder: Path, name: str) -> Path | None:
    if not stays_inside(name):
        return _OUTSIDE
    path = folder / name
    return path if path.is_file() else None
