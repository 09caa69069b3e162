"""The front door for Python users: load a model once, ask, chat, run a batch, close.

    import fila_cli

    with fila_cli.load() as model:  # the default model; or a bundle's name or folder
        answer = model.ask("report.pdf", "What is the total due?", pages=[1, 3])
        print(answer.answer, answer.pages, answer.confidence)

Pages are 1-based integers. The objects behind it (``Asker``, ``ChatSession``, ``run_batch``) stay
importable for finer control.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fila_cli.documents.document import open_document
from fila_cli.llm.sampling import SamplingParams
from fila_cli.qa.ask import Answer, Asker
from fila_cli.qa.options import AskOptions, BatchOptions, ModelOptions
from fila_cli.qa.run import BatchSummary, RecordSink, StopCheck, load_done, never_stop

TextCallback = Callable[[str], None]


def load(model: str | Path | None = None, **options) -> Model:
    """Load a model: a bundle's name (``fila weights list``), its folder, or None for ``$FILA_MODEL``
    or the default. ``options``: ``ModelOptions``' fields (device, dtype, gpu_layers, use_cache,
    cache_max_gb, llm, mmproj, fusion, verbose, compile_encoder)."""
    model_options = ModelOptions(model=None if model is None else str(model), **options)
    return Model(Asker.from_options(model_options), model_options)


def ask_options(pages: Sequence[int] | None = None, *, together: bool = False, text_layer: bool = False,
                password: str | None = None, sampling: SamplingParams | None = None,
                evidence_ocr: bool = False) -> AskOptions:
    """``AskOptions`` from a Python caller's arguments (pages: 1-based integers)."""
    return AskOptions(pages=pages, password=password, text_layer=text_layer, together=together,
                      sampling=sampling or SamplingParams(), evidence_ocr=evidence_ocr)


class Model:
    """A loaded model (vision encoder and LLM). Close it, or use it as a context manager, to free
    the LLM's memory."""

    def __init__(self, asker: Asker, options: ModelOptions | None = None):
        self.asker = asker
        self.options = options or ModelOptions()

    @property
    def name(self) -> str:
        return self.asker.model_name

    def ask(self, path: str | Path, question: str, *, pages: Sequence[int] | None = None, together: bool = False,
            text_layer: bool = False, password: str | None = None, sampling: SamplingParams | None = None,
            on_text: TextCallback | None = None, evidence_ocr: bool = False) -> Answer:
        """Answer ``question`` about the document at ``path`` (``Answer``; ``answer.to_json()`` is its
        record). ``pages``: 1-based; None lets fila choose. ``together``: the pages in one prompt.
        ``answer.evidence``: where the answer is on the pages read (``evidence_ocr``: on scanned
        pages too, by Tesseract, seconds a page)."""
        options = ask_options(pages, together=together, text_layer=text_layer, password=password, sampling=sampling,
                              evidence_ocr=evidence_ocr)
        return self.asker.ask(path, question, options, on_text=on_text)

    def chat(self, path: str | Path, *, pages: Sequence[int] | None = None, text_layer: bool = False,
             password: str | None = None, sampling: SamplingParams | None = None, evidence_ocr: bool = False):
        """A conversation about the document at ``path`` (``ChatSession``: ``.ask(question)`` per turn;
        close it, or use it as a context manager, to close the document)."""
        from fila_cli.qa.chat import ChatSession

        options = ask_options(pages, together=True, text_layer=text_layer, password=password, sampling=sampling,
                              evidence_ocr=evidence_ocr)
        document = open_document(path, password=password)
        try:
            return ChatSession(self.asker, document, options, owns_document=True)
        except BaseException:
            document.close()
            raise

    def batch(self, documents: Sequence[str | Path], questions: Sequence[str], output: str | Path, *,
              resume: bool = False, pages: Sequence[int] | None = None, together: bool = False,
              text_layer: bool = False, password: str | None = None, sampling: SamplingParams | None = None,
              settings: BatchOptions | None = None, should_stop: StopCheck = never_stop,
              evidence_ocr: bool = False) -> BatchSummary:
        """Every (document, question), one JSON record each appended to ``output`` (the ``fila batch``
        file; ``resume`` continues one). Runs in any thread; ``should_stop`` (checked between records)
        ends it early, the records in flight written whole."""
        from fila_cli.qa.batch import run_batch

        settings = settings or BatchOptions()
        options = ask_options(pages, together=together, text_layer=text_layer, password=password, sampling=sampling,
                              evidence_ocr=evidence_ocr)
        output = Path(output)
        done = load_done(output) if resume else set()
        sink = RecordSink(output)
        try:
            return run_batch(self.asker, [Path(d) for d in documents], list(questions), options, sink, settings,
                             done=done, should_stop=should_stop)
        finally:
            sink.close()

    def close(self) -> None:
        """Free the LLM (the encoder goes with the object)."""
        self.asker.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
