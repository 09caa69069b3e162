"""``fila batch --ray``: the same batch across a Ray cluster, on Ray Data.

The driver (this process) collects the documents, hashes them, skips what ``--resume`` says is
done, and alone writes the output, record by record, in whatever order the records arrive. The
documents go to Ray Data's ``map_batches`` as one block each, handled by an actor pool:

- each actor (:class:`DocumentAnswerer`) loads the model once, on its own node (the bundle resolves
  there as it does locally), and answers a document's questions with the single-machine code:
  parsing and rendering in the isolated worker with its per-document timeout, the token cache,
  prefix reuse across questions;
- documents are read by the actors from their paths, so the paths must be visible on every node
  (shared storage). fila does not ship files through Ray's object store: a batch of thousands of
  documents would fill it, and a path that only the driver sees is a set-up error worth seeing;
- a worker process that dies (killed, out of memory, a node lost) is restarted by Ray and its
  document retried once (``max_task_retries``); a document that kills workers twice comes back as no
  rows at all (``max_errored_blocks=-1`` lets the dataset go on) and is recorded as ``crash``.

Overlap (``--pipeline-depth N``, N >= 1, the default). Each actor takes N + 2 documents at once
(Ray Data's ``max_concurrent_calls_per_actor`` with ``enable_true_multi_threading``: one thread per
call) and feeds them to one ``DocumentPipeline``: the local batch's ``prepare_units`` ->
``RunAhead`` -> ``answer_units``, kept alive across calls. While its LLM answers one document, the
next one is rendered (in the document worker) and encoded (in the pipeline's thread), at most N
pages ahead, as ``fila batch`` does on one machine; ``--pipeline-depth 0`` answers one document at
a time with ``answer_document``, as before. Why this and not the alternatives:

- Ray Data stages (render, encode and answer as three ``map_batches``) would ship every page's
  visual tokens between actors through the object store, ~47 MB per page in float32 for a 7B
  model: a store sized for records would spill to disk at once, and the encoder and the LLM of a
  GPU node would sit in two actors, each wanting the GPU. In one actor the tokens never leave it.
- Several documents per ``map_batches`` call (a block of K run through ``run_batch``'s pipeline)
  would drain and refill the pipeline at every block's end, return no record before the whole
  block is answered, and retry all K documents when the worker dies.
- Here a block stays one document: its records come back as soon as it is answered, and a
  worker that dies costs the documents it had in flight (N + 2, each retried once; Ray Data
  already sent two to an actor before) rather than a block of them. The price: in the rare
  case of a document that kills its worker twice, a document that was in flight beside it both
  times is recorded as ``crash`` too; ``--resume`` answers it again.

Ray is imported only here, and only when ``--ray`` is given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fila_cli.errors import FilaError, UsageError
from fila_cli.qa.batch import answer_document
from fila_cli.qa.options import DEFAULT_PIPELINE_DEPTH, AskOptions, BatchOptions, ModelOptions
from fila_cli.qa.records import failed_record
from fila_cli.qa.run import BatchSummary, RecordSink, StopCheck, WarningReporter, never_stop

RAY_EXTRA_INSTALL = 'pip install "fila-cli[ray]"'
# A document is retried once after the worker process handling it died; a second death is its crash.
DOCUMENT_RETRIES = 1
# Object store of a local cluster that fila starts itself: records are small, documents travel by path.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def import_ray():
    """``ray`` and ``ray.data``, or a usage error that names the install command."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError(f"--ray needs Ray: {RAY_EXTRA_INSTALL}") from None
    # fila draws the progress and the summary, and records a block that failed twice as a crash: Ray
    # Data's own log of that failure (an ERROR with a traceback) would say it again, as a traceback.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    return ray


def connect(ray, address: str) -> str:
    """Join the cluster at ``address``; with ``auto``, a running one or else a new local one; with
    ``local``, always a new one of this machine alone."""
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
    if address == "local":  # a private cluster on this machine, even when another one runs here
        ray.init(address="local", object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
        return "started a private local cluster"
    if address == "auto":
        try:
            ray.init(address="auto", **{k: v for k, v in quiet.items() if k != "include_dashboard"})
            return "joined the running cluster"
        except ConnectionError:
            ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
            return "started a local cluster (no running one found)"
    try:
        ray.init(address=address, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise UsageError(f"--ray {address}: cannot join that cluster ({error}); start it with `ray start --head`") from None
    return f"joined {address}"


@dataclass
class WorkItem:
    """One document and the questions still to answer about it."""

    file: str  # the path the workers open: absolute, so that it means the same on every node
    sha256: str | None
    questions: list[str]
    name: str = ""  # the path as the user gave it, which the records carry (as in a local batch)


class DocumentAnswerer:
    """A Ray actor: the model loaded once, answering whole documents as ``fila batch`` does locally.

    With ``pipeline_depth`` >= 1, Ray calls it from several threads at once (one document each) and
    their documents share one overlapped ``DocumentPipeline``; with 0, one call at a time.
    """

    def __init__(self, model: ModelOptions, options: AskOptions, n_questions: int, timeout_s: float,
                 pipeline_depth: int = DEFAULT_PIPELINE_DEPTH, password: Any = None):
        import ray

        from fila_cli.qa.ask import Asker
        from fila_cli.qa.document_pipeline import DocumentPipeline
        from fila_cli.qa.isolation import DocumentWorker

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        if password is not None:  # an object-store reference: not in the actor's creation arguments
            options = dataclasses.replace(options, password=ray.get(password) if isinstance(password, ray.ObjectRef) else password)
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.options = options
        self.model_error: str | None = None
        try:
            self.asker = Asker.from_options(model, reuse_prefix=n_questions > 1)
        except FilaError as error:  # reported per record, and by the driver once per node
            self.asker, self.model_error = None, f"on {socket.gethostname()}: {error}"
        self.worker = DocumentWorker(timeout_s)
        self.pipeline = (DocumentPipeline(self.asker, self.worker, options, pipeline_depth)
                         if self.asker is not None and pipeline_depth > 0 else None)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        records, items, where, restarted, finished_at = [], [], [], [], []
        for item, file, name, sha256, questions in zip(batch["item"], batch["file"], batch["name"], batch["sha256"],
                                                        batch["questions"]):
            answered = self._answer(str(file), str(name), None if sha256 == "" else str(sha256), [str(q) for q in questions])
            finished = time.time()  # the worker's clock: a record reaches the driver later, by how much varies
            for record in answered:
                records.append(record)
                items.append(int(item))
                where.append(self.where)
                restarted.append(self.restarted)
                finished_at.append(finished)
        # load_failed: the driver reports a model that cannot load once, apart from the model-kind
        # records of a loaded model (pages that overflow its context, with --together).
        return {"record": records, "item": items, "worker": where, "restarted": restarted, "finished_at": finished_at,
                "load_failed": [self.asker is None] * len(records)}

    def _answer(self, file: str, name: str, sha256: str | None, questions: list[str]):
        if self.asker is None:
            return [failed_record(Path(file), q, "", "model", self.model_error or "no model", sha256=sha256) for q in questions]
        if self.pipeline is not None:
            return self.pipeline.submit(Path(file), sha256, questions, name=name or None)
        return answer_document(self.asker, self.worker, Path(file), sha256, questions, self.options, name=name or None)


@dataclass
class ClusterProgress:
    """What the driver's progress bar shows: pages per minute and the workers heard from."""

    started: float
    pages: int = 0
    workers: set[str] | None = None
    restarted_workers: set[str] | None = None
    finished_at: float | None = None  # when the worker had the last record ready (its clock, time.time())

    def add(self, record: dict[str, Any], worker: str, restarted: bool, finished_at: float | None = None) -> None:
        self.finished_at = finished_at
        self.workers = (self.workers or set()) | {worker}
        if restarted:
            self.restarted_workers = (self.restarted_workers or set()) | {worker}
        self.pages += len(record.get("pages") or [])

    def pages_per_minute(self) -> float:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return 60.0 * self.pages / elapsed


def run_batch_on_ray(items: list[WorkItem], model: ModelOptions, options: AskOptions, sink: RecordSink,
                     batch: BatchOptions, *, model_name: str,
                     on_record: Callable[[ClusterProgress], None] | None = None,
                     on_message: Callable[[str], None] = lambda message: None,
                     on_warning: Callable[[str], None] = lambda warning: None,
                     should_stop: StopCheck = never_stop) -> BatchSummary:
    """Answer ``items`` on the cluster at ``batch.ray_address``; write each record to ``sink`` as it
    arrives. ``batch.depth``: pages each worker renders and encodes ahead of its LLM (0: one stage
    at a time). ``on_warning``: each damaged document's warnings, once, as a local batch says them.
    ``should_stop``: checked after each record; True stops the run there (no signal handler is
    installed: the caller owns the signals)."""
    if batch.ray_address is None:
        raise UsageError("run_batch_on_ray needs BatchOptions.ray_address (auto, local, or the cluster's address)")
    address, timeout_s, pipeline_depth = batch.ray_address, batch.timeout_s, batch.depth
    actors, cpus_per_actor = batch.ray_actors, batch.ray_cpus
    ray = import_ray()
    on_message(f"ray: {connect(ray, address)}")
    summary = BatchSummary()
    progress = ClusterProgress(started=time.monotonic())
    model_errors_reported: set[str] = set()
    report_warnings = WarningReporter(on_warning)
    try:
        dataset = _dataset(ray, items)
        with warnings.catch_warnings():
            # Ray Data still takes the actors' retry settings as ray_remote_args (deprecated for 2.64,
            # with no replacement yet): the pin in pyproject's `ray` extra keeps them working.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            answered = dataset.map_batches(
                DocumentAnswerer,
                # The password goes by reference to the object store, not in the actors' creation
                # arguments, which Ray shows (`ray list actors --detail`, the dashboard) and logs.
                fn_constructor_kwargs=dict(model=model, options=dataclasses.replace(options, password=None),
                                           password=None if options.password is None else ray.put(options.password),
                                           timeout_s=timeout_s,
                                           n_questions=max(len(item.questions) for item in items),
                                           pipeline_depth=pipeline_depth),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=actors or _default_actors(ray, cpus_per_actor),
                                                   **_documents_per_actor(pipeline_depth)),
                **_actor_resources(ray, cpus_per_actor),
                max_task_retries=DOCUMENT_RETRIES,  # a worker that dies: its document goes to the replacement
                max_restarts=-1,  # dead workers are always replaced
            )
        # By the item's position: two given paths of one file (a link, a copy's bind mount) are two items.
        pending = {(position, question) for position, item in enumerate(items) for question in item.questions}
        for row in answered.iter_rows():
            record = row["record"]
            item = items[row["item"]]
            pending.discard((row["item"], record["question"]))
            record["file"] = item.name or item.file
            if row["load_failed"]:
                _report_model_error_once(record["error"]["message"], model_errors_reported, on_message)
            record = {**record, "model": record["model"] or model_name}
            sink.write(record)
            report_warnings(record)
            summary.count(record)
            progress.add(record, row["worker"], row["restarted"], row["finished_at"])
            if on_record is not None:
                on_record(progress)
            if should_stop():
                summary.interrupted = True
                return summary
        for position, item in enumerate(items):  # documents whose block failed twice: they killed their workers
            for question in item.questions:
                if (position, question) in pending:
                    record = failed_record(Path(item.name or item.file), question, model_name, "crash",
                                           f"{item.file}: a fila worker died twice on it (killed, out of memory, or a crash)",
                                           sha256=item.sha256)
                    sink.write(record)
                    summary.count(record)
        summary.restarted_workers = len(progress.restarted_workers or ())
        return summary
    finally:
        ray.shutdown()


def _dataset(ray, items: list[WorkItem]):
    from ray.data import DataContext

    context = DataContext.get_current()
    context.max_errored_blocks = -1  # a document that fails twice is recorded as crash; the rest go on
    context.enable_progress_bars = False  # the driver draws one bar for the cluster
    rows = [{"item": position, "file": item.file, "name": item.name, "sha256": item.sha256 or "", "questions": item.questions}
            for position, item in enumerate(items)]
    return ray.data.from_items(rows, override_num_blocks=len(rows))  # one document a block: retried alone


def _documents_per_actor(pipeline_depth: int) -> dict[str, Any]:
    """Overlap: N + 2 documents in an actor at once, one call (thread) each: the one its LLM
    answers, up to N being prepared (one-page documents: N pages ahead) and one waiting in the
    pipeline's queue, because Ray Data takes a while to send a document into a freed slot (up to
    half a second measured, Ray 2.60) and the pipeline should not wait for it. None waits queued
    outside the pipeline: a worker's death retries only documents that were in it. Without
    overlap, Ray Data's defaults, as before (one call at a time, two sent)."""
    if pipeline_depth <= 0:
        return {}
    in_flight = pipeline_depth + 2
    return dict(max_concurrent_calls_per_actor=in_flight, enable_true_multi_threading=True,
                max_tasks_in_flight_per_actor=in_flight)


def _default_actors(ray, cpus_per_actor: float) -> int:
    """One actor per GPU of the cluster, else as many as its CPUs hold at ``cpus_per_actor`` each."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return gpus if gpus else max(1, int(resources.get("CPU", 1) // cpus_per_actor))


def _actor_resources(ray, cpus_per_actor: float) -> dict[str, float]:
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1}
    return {"num_cpus": cpus_per_actor}


def _report_model_error_once(message: str, reported: set[str], on_message: Callable[[str], None]) -> None:
    if message not in reported:
        reported.add(message)
        on_message(f"fila: error: the model cannot load {message}")

