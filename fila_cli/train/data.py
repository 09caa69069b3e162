"""Reading LLaVA conversation data: JSON (a list) or JSON Lines, one sample per conversation.

A sample is ``{"id": ..., "image": "page.png" | "file.pdf#page=3", "conversations": [{"from":
"human" | "gpt" | "system", "value": "..."}]}`` with ``<image>`` in the first human turn. Image paths
are relative to ``--images``. Records that are not even shaped like a sample are reported as bad
samples by the caller (:class:`BadSample`), never a crash mid-epoch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from fila_cli.bundles.bundle import stays_inside
from fila_cli.errors import UsageError

IMAGE_PLACEHOLDER = "<image>"
# LLaVA's speaker names -> chat-template roles.
ROLE_OF_SPEAKER = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# ``file.pdf#page=3``: a 1-based page of a PDF (or a multi-frame TIFF).
_PAGE_FRAGMENT = re.compile(r"^(?P<path>.+)#page=(?P<page>[1-9][0-9]*)$")


class BadSample(Exception):
    """A sample that cannot be trained on; the message is one line saying why."""


@dataclass(frozen=True)
class ImageRef:
    path: Path
    page: int  # 1-based

    def __str__(self) -> str:
        return f"{self.path}#page={self.page}" if self.page != 1 else str(self.path)


@dataclass(frozen=True)
class Conversation:
    sample_id: str
    image: ImageRef
    # [(role, text)] with roles user / assistant / system, in order.
    messages: tuple[tuple[str, str], ...]


def parse_image_ref(value: str, images_dir: Path) -> ImageRef:
    """``value`` (``scan.pdf#page=2``, ``img.png``) in ``images_dir``. The name stays in that folder
    (no absolute path, no ".."): a dataset from elsewhere must not make fila read any file it names."""
    match = _PAGE_FRAGMENT.match(value)
    name, page = (match["path"], int(match["page"])) if match else (value, 1)
    if not stays_inside(name):
        raise BadSample(f"image {value!r} is outside --images; name it relative to that folder, without '..'")
    return ImageRef(images_dir / name, page)


def read_records(path: Path) -> list[object]:
    """The raw records of a .json (a list) or .jsonl file. A file that cannot be read at all is a
    usage error; a malformed line of a JSON Lines file becomes a record that fails later (skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{path}: cannot read the training data ({error.strerror or error}); pass --data a LLaVA conversation .json or .jsonl") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); fix the file or write it as JSON Lines") from None
        return list(records)
    records: list[object] = []
    for number, line in enumerate(text.split("\n"), start=1):  # \n only: a row may hold U+2028 raw
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            records.append(BadSample(f"line {number}: not valid JSON ({error.msg})"))
    return records


def parse_conversation(record: object, index: int, images_dir: Path) -> Conversation:
    """One record -> a Conversation, or BadSample saying what is wrong with it."""
    if isinstance(record, BadSample):
        raise record
    if not isinstance(record, dict):
        raise BadSample(f"sample {index}: not a JSON object")
    sample_id = str(record.get("id", index))
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise BadSample(f"sample {sample_id}: no image")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample(f"sample {sample_id}: no conversations")
    messages = []
    for turn in turns:
        speaker = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if speaker not in ROLE_OF_SPEAKER or not isinstance(value, str):
            raise BadSample(f"sample {sample_id}: a turn is not {{from: human|gpt|system, value: text}}")
        messages.append((ROLE_OF_SPEAKER[speaker], value))
    first_user = next((text for role, text in messages if role == "user"), None)
    if first_user is None or IMAGE_PLACEHOLDER not in first_user:
        raise BadSample(f"sample {sample_id}: the first human turn has no {IMAGE_PLACEHOLDER}")
    if sum(text.count(IMAGE_PLACEHOLDER) for _, text in messages) != 1:
        raise BadSample(f"sample {sample_id}: more than one {IMAGE_PLACEHOLDER}; one image per sample is supported")
    if not any(role == "assistant" for role, _ in messages):
        raise BadSample(f"sample {sample_id}: no gpt answer to learn")
    try:
        return Conversation(sample_id, parse_image_ref(image, images_dir), tuple(messages))
    except BadSample as error:
        raise BadSample(f"sample {sample_id}: {error}") from None
