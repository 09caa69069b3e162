"""Reading the data once before training: every sample tokenised, its image opened and its
sequence length known, bad samples skipped and counted (one warning line each).

Knowing every sample's label-token count up front is what lets the loss be normalised by the
global batch's token count, identically on one device or many.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fila_cli.documents.canvas import plan_canvas
from fila_cli.errors import FilaError
from fila_cli.train.chat import ChatRenderer
from fila_cli.train.data import BadSample, parse_conversation, read_records
from fila_cli.train.model import PreparedSample
from fila_cli.vision.anyres import RenderedPage, render_uint8
from fila_cli.vision.encode import render_page
from fila_cli.vision.model.encoder import HybridEncoder


@dataclass
class PreparedData:
    samples: list[PreparedSample]
    # reason -> count, for the run's summary.
    skipped: Counter = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def _reason(message: str) -> str:
    """A short category for the summary (the part after 'sample X: ')."""
    tail = message.split(": ", 1)[-1]
    for key in ("image", "placeholder", "<image>", "longer", "template", "JSON", "answer", "turn"):
        if key in tail:
            return {"<image>": "no <image>", "placeholder": "no <image>", "longer": "too long", "JSON": "bad record",
                    "turn": "bad record", "answer": "no answer", "template": "template"}.get(key, "image")
    return "other"


def prepare_data(
    data: Path,
    images: Path,
    renderer: ChatRenderer,
    encoder: HybridEncoder,
    max_length: int,
    warn: Callable[[str], None],
    on_progress: Callable[[int, int], None] | None = None,
) -> PreparedData:
    records = read_records(data)
    prepared = PreparedData(samples=[])
    for index, record in enumerate(records):
        try:
            prepared.samples.append(prepare_sample(record, index, images, renderer, encoder, max_length))
        except BadSample as bad:
            prepared.skipped[_reason(str(bad))] += 1
            warn(f"skipped {bad}")
        if on_progress is not None:
            on_progress(index + 1, len(records))
    return prepared


def prepare_sample(record: object, index: int, images: Path, renderer: ChatRenderer, encoder: HybridEncoder, max_length: int) -> PreparedSample:
    conversation = parse_conversation(record, index, images)
    tokens = renderer.tokenize(conversation)
    try:
        image = render_page(conversation.image.path, conversation.image.page, encoder.anyres, encoder.highres_scale)
    except FilaError as error:  # missing, unreadable, no such page
        raise BadSample(f"sample {conversation.sample_id}: image {error}") from None
    geometry = plan_canvas((image.height, image.width), encoder.anyres)
    sample = PreparedSample(index, conversation, tokens, encoder.count_tokens(geometry))
    if sample.length > max_length:
        raise BadSample(f"sample {conversation.sample_id}: {sample.length} tokens, longer than --max-length {max_length}")
    if tokens.n_label_tokens == 0:
        raise BadSample(f"sample {conversation.sample_id}: no answer tokens after tokenisation")
    return sample


def load_sample_image(sample: PreparedSample, encoder: HybridEncoder):
    return render_page(sample.conversation.image.path, sample.conversation.image.page, encoder.anyres, encoder.highres_scale)


def render_pages(samples: list[PreparedSample], encoder: HybridEncoder) -> dict[int, RenderedPage]:
    """Every sample's page rendered once, uint8, on the CPU (``--cache-pages``), by sample index."""
    return {sample.index: render_uint8(load_sample_image(sample, encoder), encoder.anyres, encoder.highres_scale)
            for sample in samples}
