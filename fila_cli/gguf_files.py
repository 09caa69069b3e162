"""GGUF files: the one place that opens them and reads their header.

Every GGUF reader of fila (bundle detection, the LLM backend, the mmproj loader) starts here: the
file exists and is a GGUF (:func:`require_gguf`), a parse that fails is one ModelError naming the
file (:func:`open_gguf`), and the header keys fila decides on are read once (:func:`read_gguf_header`).
``gguf`` is imported only when a file is read, so this bottom module stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fila_cli.errors import ModelError

if TYPE_CHECKING:
    from gguf import GGUFReader

GGUF_MAGIC = b"GGUF"
# general.architecture of an mmproj (vision projector); LLMs name theirs ("llama", ...).
CLIP_ARCHITECTURE = "clip"
# general.type of a LoRA adapter; adapters belong to an LLM but are never one.
ADAPTER_TYPE = "adapter"
KEY_ARCHITECTURE = "general.architecture"
KEY_TYPE = "general.type"
KEY_NAME = "general.name"
# "{architecture}.context_length": the context the model was trained with.
KEY_CONTEXT_LENGTH = "{architecture}.context_length"


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def require_gguf(path: Path, role: str, hint: str) -> None:
    """ModelError naming the file unless it is a readable GGUF. role: "LLM", "mmproj"; hint: what to pass instead."""
    if not path.is_file():
        raise ModelError(f"{path}: no such {role} file; {hint}")
    try:
        magic_ok = is_gguf(path)
    except OSError as error:
        raise ModelError(f"{path}: cannot read the {role} file ({error.strerror}); check its permissions") from error
    if not magic_ok:
        raise ModelError(f"{path}: not a GGUF file; {hint}")


def open_gguf(path: Path, role: str = "GGUF", hint: str = "download or convert it again") -> GGUFReader:
    """A memory-mapped reader (tensor data is read only when touched); a bad file is a ModelError naming it."""
    from gguf import GGUFReader

    require_gguf(path, role, hint)
    try:
        return GGUFReader(path, "r")
    except Exception as error:  # the reader raises ValueError, struct.error, IndexError on truncation...
        raise ModelError(f"cannot read GGUF file {path}: corrupt or truncated ({error}); {hint}") from error


@dataclass(frozen=True)
class GGUFHeader:
    architecture: str  # general.architecture: "clip" for mmproj files, "llama", ... for LLMs
    type: str | None  # general.type: "model", "adapter" or absent
    name: str | None = None  # general.name
    context_length: int | None = None  # {architecture}.context_length: the trained context (LLMs)

    @property
    def is_vision(self) -> bool:
        return self.architecture == CLIP_ARCHITECTURE

    @property
    def is_adapter(self) -> bool:
        return self.type == ADAPTER_TYPE


def gguf_header(reader: GGUFReader, path: Path) -> GGUFHeader:
    """The header keys fila decides on, from an open reader."""

    def value(key: str):
        field = reader.get_field(key)
        return field.contents() if field is not None else None

    try:
        architecture = value(KEY_ARCHITECTURE)
        file_type, name = value(KEY_TYPE), value(KEY_NAME)
        context_length = value(KEY_CONTEXT_LENGTH.format(architecture=architecture)) if isinstance(architecture, str) else None
    except Exception as error:  # a damaged key/value section
        raise ModelError(f"{path}: corrupt GGUF header ({error}); download or convert it again") from error
    if not isinstance(architecture, str):
        raise ModelError(f"GGUF file {path} has no general.architecture; cannot tell LLM from mmproj")
    return GGUFHeader(
        architecture=architecture,
        type=file_type if isinstance(file_type, str) else None,
        name=name if isinstance(name, str) else None,
        context_length=int(context_length) if isinstance(context_length, int) and context_length > 0 else None,
    )


def read_gguf_header(path: Path, role: str = "GGUF") -> GGUFHeader:
    """Read the header of a GGUF file (memory-mapped: tensor data is not read)."""
    return gguf_header(open_gguf(Path(path), role), Path(path))
