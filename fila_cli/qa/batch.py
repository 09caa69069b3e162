"""``fila batch``: many documents, many questions, one JSON record each, nothing lost.

- One record per (document, question), flushed (and fsync'd to a file) as soon as it is answered:
  ``kill -9`` loses at most the record in flight.
- ``--resume`` skips the (document sha256, question, model) triples the output already holds, after
  cutting a torn last line left by a kill mid-write.
- Documents are opened and rendered in an isolated worker (``isolation.py``): a crash or hang is
  that document's error record, and the batch goes on.
- Ctrl-C stops after the record in flight.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fila_cli.qa.ask import Asker, AskOptions, PageSource
from fila_cli.documents.document import file_sha256
from fila_cli.documents.notices import warning_lines
from fila_cli.errors import FilaError, UsageError
from fila_cli.qa.isolation import DocumentWorker, WorkerFailure

DOCUMENT_SUFFIXES = {".pdf", ".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"}
_GLOB_CHARACTERS = set("*?[")


def collect_documents(paths: list[str], recursive: bool) -> list[Path]:
    """Files as given, the documents of folders (descending with ``recursive``), and globs."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.iterdir()
            found.extend(sorted(p for p in walk if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES))
        elif not path.exists() and _GLOB_CHARACTERS & set(raw):
            found.extend(sorted(Path(p) for p in glob.glob(raw, recursive=recursive) if Path(p).is_file()))
        else:
            found.append(path)  # a missing file becomes its own error record
    unique: dict[Path, None] = dict.fromkeys(found)
    return list(unique)


def read_questions(questions: list[str], questions_file: Path | None) -> list[str]:
    all_questions = [q.strip() for q in questions if q.strip()]
    if questions_file is not None:
        try:
            all_questions += [line.strip() for line in questions_file.read_text().splitlines() if line.strip()]
        except OSError as error:
            raise UsageError(f"{questions_file}: cannot read the questions file ({error.strerror})") from None
    if not all_questions:
        raise UsageError("no question: pass -q QUESTION (repeatable) or --questions FILE (one per line)")
    return list(dict.fromkeys(all_questions))


def record_key(record: dict[str, Any]) -> tuple[str | None, str, str]:
    return record.get("sha256"), record.get("question", ""), record.get("model", "")


def load_done(out: Path, key: Callable[[dict[str, Any]], tuple] = record_key) -> set[tuple]:
    """Prepare ``out`` for ``--resume``; return the keys of the records it holds that succeeded.

    ``key`` names a record's unit of work (``fila batch``: document sha256, question, model).

    A torn last line (a kill in the middle of a write) is cut off. Failed records are removed, so
    that they are tried again without leaving two records for one (document, question, model).
    """
    if not out.exists():
        return set()
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    kept: list[bytes] = []
    done = set()
    for line in complete.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # not a record of ours: dropped rather than carried along
        if isinstance(record, dict) and record.get("error") is None and key(record) not in done:
            done.add(key(record))
            kept.append(line)
    rewritten = b"".join(line + b"\n" for line in kept)
    if rewritten != data:
        _replace_atomically(out, rewritten)
    return done


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path`` and rename it over ``path``: a kill leaves the old or the new file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


class RecordSink:
    """JSON lines to stdout or to a file, each flushed (and fsync'd) as soon as it is written.

    To a file, a record goes out in one ``write`` system call on an ``O_APPEND`` descriptor (no
    user-space buffer that could split it), then fsync: Ctrl-C between records cannot tear one, and
    only a ``kill -9`` landing inside that one call could, which ``--resume`` cuts off.
    """

    def __init__(self, out: Path | None):
        self.out = out
        self._fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if out is not None else None

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._fd is None:
            sys.stdout.write(line)
            sys.stdout.flush()
            return
        data = line.encode("utf-8")
        while data:  # a regular file takes it whole; the loop only guards against a short write
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class BatchSummary:
    answered: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False
    failures: dict[str, int] = field(default_factory=dict)
    restarted_workers: int = 0  # --ray: worker processes that died and were replaced (their documents retried)

    def line(self) -> str:
        parts = [f"{self.answered} answered", f"{self.failed} failed"]
        if self.skipped:
            parts.append(f"{self.skipped} already done (--resume)")
        if self.failures:
            parts.append("failures: " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.failures.items())))
        if self.restarted_workers:
            parts.append(f"{self.restarted_workers} worker(s) restarted, their documents retried")
        return ("interrupted: " if self.interrupted else "") + "; ".join(parts)


class WarningReporter:
    """Says each document's warnings once (every record of the document carries them), on the
    first of its records that has any: the local batch and ``--ray`` print the same lines."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self._warned: set[str] = set()

    def __call__(self, record: dict[str, Any]) -> None:
        if record.get("warnings") and record["file"] not in self._warned:
            self._warned.add(record["file"])
            for warning in record["warnings"]:
                self.say(warning)


class StopFlag:
    """Ctrl-C sets it; the batch stops after the record in flight."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True


def failed_record(file: Path, question: str, model: str, sha256: str | None, kind: str, message: str) -> dict[str, Any]:
    return {"file": str(file), "question": question, "answer": None, "pages": None, "confidence": None, "model": model,
            "timings": None, "tokens": None, "page_choice": None, "warnings": [], "sha256": sha256,
            "error": {"kind": kind, "message": message}}


def run_batch(asker: Asker, documents: list[Path], questions: list[str], options: AskOptions, sink: RecordSink, *,
              timeout_s: float, done: set | None = None, on_record: Callable[[], None] | None = None,
              on_warning: Callable[[str], None] | None = None) -> BatchSummary:
    summary = BatchSummary()
    stop = StopFlag()
    previous_handler = signal.signal(signal.SIGINT, stop)
    worker = DocumentWorker(timeout_s)
    done = done or set()
    report_warnings = WarningReporter(on_warning or (lambda warning: None))
    try:
        for file in documents:
            sha256 = sha256_or_none(file)
            for question in questions:
                if stop.requested:
                    summary.interrupted = True
                    return summary
                if (sha256, question, asker.model_name) in done:
                    summary.skipped += 1
                else:
                    record = _answer_one(asker, worker, file, sha256, question, options)
                    sink.write(record)
                    report_warnings(record)
                    if record["error"] is None:
                        summary.answered += 1
                    else:
                        summary.failed += 1
                        kind = record["error"]["kind"]
                        summary.failures[kind] = summary.failures.get(kind, 0) + 1
                if on_record is not None:
                    on_record()
        summary.interrupted = stop.requested
        return summary
    finally:
        worker.close()
        signal.signal(signal.SIGINT, previous_handler)


def sha256_or_none(file: Path) -> str | None:
    try:
        return file_sha256(file)
    except (OSError, FilaError):
        return None


def answer_document(asker: Asker, worker: DocumentWorker, file: Path, sha256: str | None, questions: list[str],
                    options: AskOptions, *, name: str | None = None) -> list[dict[str, Any]]:
    """Every question about one document, one record each (a Ray worker's unit of work). ``name``:
    the path as the user gave it, which the warnings name (``file`` is the one to open)."""
    return [_answer_one(asker, worker, file, sha256, question, options, name=name) for question in questions]


def _answer_one(asker: Asker, worker: DocumentWorker, file: Path, sha256: str | None, question: str,
                options: AskOptions, *, name: str | None = None) -> dict[str, Any]:
    model = asker.model_name
    if sha256 is None:
        return failed_record(file, question, model, None, "document", f"{file}: no such file or not readable; check the path")
    try:
        plan = worker.open(file, question, options.pages, options.password)
        anyres, highres_scale = asker.encoder.anyres, asker.encoder.highres_scale
        sources = [PageSource(index, render=partial(worker.render, file, index, anyres, options.text_layer, highres_scale),
                              text=partial(worker.text, file, index)) for index in plan.page_indices]
        answer = asker.answer_pages(str(file), question, sources, plan.reason, options, sha256, method=plan.method)
        # What the worker heard opening and rendering, and what the cached pages' renders heard.
        answer.warnings = warning_lines(name or file, worker.notices(file).merged(answer.notices))
    except WorkerFailure as error:
        return failed_record(file, question, model, sha256, error.kind, str(error))
    except FilaError as error:
        return failed_record(file, question, model, sha256, error.kind, str(error))
    except Exception as error:  # one bad document must never end the batch
        return failed_record(file, question, model, sha256, "error", f"{file}: unexpected {type(error).__name__}: {error}")
    return {**answer.to_json(), "sha256": sha256, "error": None}
