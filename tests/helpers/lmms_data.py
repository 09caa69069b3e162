"""Tiny evaluation data in lmms-eval's layouts, written at test time.

The schemas are those of lmms-eval's hub copies: images as the ``{bytes, path}`` struct the
``datasets`` library writes for an ``Image`` feature, the other columns with their hub names and types.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers.tiny_vision import page_image

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

SCHEMAS = {
    "docvqa": pa.schema([("questionId", pa.string()), ("question", pa.string()), ("question_types", pa.list_(pa.string())),
                         ("image", IMAGE_TYPE), ("docId", pa.int64()), ("ucsf_document_id", pa.string()),
                         ("ucsf_document_page_no", pa.string()), ("answers", pa.list_(pa.string())),
                         ("data_split", pa.string())]),
    "textvqa": pa.schema([("image_id", pa.string()), ("question_id", pa.int32()), ("question", pa.string()),
                          ("question_tokens", pa.list_(pa.string())), ("image", IMAGE_TYPE), ("image_width", pa.int32()),
                          ("image_height", pa.int32()), ("flickr_original_url", pa.string()),
                          ("flickr_300k_url", pa.string()), ("answers", pa.list_(pa.string())),
                          ("image_classes", pa.list_(pa.string())), ("set_name", pa.string()),
                          ("ocr_tokens", pa.list_(pa.string()))]),
    "chartqa": pa.schema([("type", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("image", IMAGE_TYPE)]),
}


def png_bytes(height: int = 300, width: int = 240, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    page_image(height, width, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, task: str, rows: list[dict]) -> Path:
    """Rows with only the columns that matter; the others are filled with plausible values."""
    schema = SCHEMAS[task]
    filled = [{name: row.get(name, _filler(schema.field(name).type)) for name in schema.names} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(filled, schema=schema), path)
    return path


def _filler(kind: pa.DataType):
    if pa.types.is_list(kind):
        return []
    if pa.types.is_integer(kind):
        return 0
    if pa.types.is_struct(kind):
        return None
    return ""


def image(data: bytes | None = None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}
