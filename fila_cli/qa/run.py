"""What every run that writes records shares (``fila batch``, its ``--ray`` driver, ``fila eval``):
the record sink, ``--resume``'s reading of what is done, the summary, and how a run is told to stop.

A run never installs a signal handler (it may run in a worker thread, in a server or a notebook):
it takes ``should_stop``, a callable it checks between records. The CLI owns the signals
(``cli/stopping.py``): Ctrl-C or SIGTERM sets what ``should_stop`` reads.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fila_cli.atomic_files import write_bytes_atomically

# Checked between records: True asks the run to stop after the record(s) in flight, written whole.
StopCheck = Callable[[], bool]


def never_stop() -> bool:
    return False


def record_key(record: dict[str, Any]) -> tuple[str, str | None, str, str]:
    """A ``fila batch`` record's unit of work, (document as given, question, model), with the
    document's sha256: the same file name with other bytes is other work (``unit_key``)."""
    return record.get("file", ""), record.get("sha256"), record.get("question", ""), record.get("model", "")


def unit_key(file: Path, sha256: str | None, question: str, model: str) -> tuple[str, str | None, str, str]:
    """``record_key`` of the record a unit writes."""
    return str(file), sha256, question, model


def load_done(out: Path, key: Callable[[dict[str, Any]], tuple] = record_key,
              keep: Callable[[dict[str, Any]], bool] = lambda record: True) -> set[tuple]:
    """Prepare ``out`` for ``--resume``; return the keys of the records it holds that succeeded.

    ``key`` names a record's unit of work (``fila batch``: document as given, its sha256, question,
    model; two files with equal bytes are two units). ``keep``: False for a record to drop (``fila
    batch``: its document's bytes changed since, so it is answered again).

    A torn last line (a kill in the middle of a write) is cut off. Failed records are removed, so
    that they are tried again without leaving two records for one unit. Lines end at ``\n`` only:
    a record may hold U+2028 and its kin raw.
    """
    if not out.exists():
        return set()
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    kept: list[bytes] = []
    done = set()
    for line in complete.split(b"\n")[:-1]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # not a record of ours: dropped rather than carried along
        if (isinstance(record, dict) and record.get("error") is None and key(record) not in done
                and keep(record)):
            done.add(key(record))
            kept.append(line)
    rewritten = b"".join(line + b"\n" for line in kept)
    if rewritten != data:
        write_bytes_atomically(out, rewritten)  # a kill leaves the old or the new file
    return done


def json_line(record: dict[str, Any]) -> bytes:
    """One record as a UTF-8 JSON line. A file name that is not UTF-8 (its bytes held as lone
    surrogates, Python's ``surrogateescape``) is written with JSON's ``\\udcXX`` escapes, the only
    characters UTF-8 cannot encode: ``os.fsencode(record["file"])`` gives its bytes back."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


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
        data = json_line(record)
        if self._fd is None:
            sys.stdout.write(data.decode("utf-8"))
            sys.stdout.flush()
            return
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

    def count(self, record: dict[str, Any]) -> None:
        """Add a written record: answered, or failed (by its error's kind)."""
        if record["error"] is None:
            self.answered += 1
        else:
            self.failed += 1
            kind = record["error"]["kind"]
            self.failures[kind] = self.failures.get(kind, 0) + 1

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
