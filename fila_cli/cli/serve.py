"""`fila serve`: one process holds the model and answers over HTTP (``fila_cli.serve``)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fila_cli.cli.options import (
    CacheMaxGbOption,
    CommandOptions,
    CompileOption,
    CtxSizeOption,
    DeviceOption,
    DtypeOption,
    FusionOption,
    GpuLayersOption,
    LlmOption,
    MmprojOption,
    ModelOption,
    TemplateOption,
    load_asker,
)
from fila_cli.cli.support import EXIT_CODES_HELP, VerboseOption, handle_errors, stderr
from fila_cli.qa.options import ModelOptions
from fila_cli.serve.settings import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
)

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind. Anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one, printed on stderr).")] = DEFAULT_PORT,
    socket_path: Annotated[Path | None, typer.Option("--socket", help="Listen on this Unix socket instead (created 0600: this user only).", show_default=False)] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="FILA_API_KEY", help="Require `Authorization: Bearer KEY` on every /v1 request ($FILA_API_KEY). Needed to bind an address other than loopback.", show_default=False)] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait for the LLM; past it the server answers 503 with Retry-After.")] = DEFAULT_MAX_QUEUE,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest document a request may send, in MB (413 past it).")] = DEFAULT_MAX_UPLOAD_MB,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds the isolated document worker may spend opening and rendering one document.")] = DEFAULT_TIMEOUT_S,
    max_sessions: Annotated[int, typer.Option("--max-sessions", help="Chat sessions held at once (each keeps its pages' LLM state in memory).")] = DEFAULT_MAX_SESSIONS,
    allow_fetch: Annotated[bool, typer.Option("--allow-fetch", help="Let /v1/chat/completions fetch http(s) image URLs (off: data URLs only).")] = False,
    idle_exit: Annotated[str | None, typer.Option("--idle-exit", help="Exit after this long without a request, e.g. 5m (what `fila ask --keep-alive` starts servers with).", show_default=False)] = None,
    parallel: Annotated[int, typer.Option("--parallel", help="Answer up to N waiting questions side by side in one LLM step (as fila batch --parallel; N KV caches of the model's context in memory). Their answers come whole, not streamed token by token.")] = 1,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", help="On SIGTERM or Ctrl-C: seconds the requests in flight may take to finish before they are cancelled.")] = DEFAULT_SHUTDOWN_TIMEOUT_S,
    compile_encoder: CompileOption = False,
    model: ModelOption = None,
    llm: LlmOption = None,
    mmproj: MmprojOption = None,
    fusion: FusionOption = None,
    gpu_layers: GpuLayersOption = ModelOptions.gpu_layers,
    ctx_size: CtxSizeOption = None,
    template: TemplateOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Read and write the caches: visual tokens and LLM prefix states (see `fila cache`).")] = True,
    cache_max_gb: CacheMaxGbOption = ModelOptions.cache_max_gb,
    verbose: VerboseOption = False,
) -> None:
    """Hold the model in memory and answer over HTTP: `fila ask`, `fila chat` and OpenAI clients.

    Endpoints: POST /v1/ask (a multipart upload; the `fila ask --json` record), /v1/chat/sessions
    (`fila chat`), POST /v1/chat/completions (OpenAI-compatible, documents as image_url data URLs),
    GET /v1/models, GET /health; the API's own page is /docs. `fila ask --server URL` uses it.
    SIGTERM stops taking requests, lets those in flight finish (--shutdown-timeout) and exits 0.
    """
    with handle_errors(verbose):
        from fila_cli.serve.keepalive import parse_duration
        from fila_cli.serve.listen import bind_tcp, bind_unix
        from fila_cli.serve.settings import ServeSettings

        settings = ServeSettings(max_queue=max_queue, max_upload_mb=max_upload_mb, timeout_s=timeout, api_key=api_key,
                                 allow_fetch=allow_fetch, max_sessions=max_sessions,
                                 idle_exit_s=parse_duration(idle_exit, "--idle-exit") if idle_exit else None)
        settings.check()
        if parallel < 1:
            from fila_cli.errors import UsageError

            raise UsageError(f"--parallel must be at least 1 (got {parallel})")
        if socket_path is None and host not in LOOPBACK_HOSTS and not api_key:
            from fila_cli.errors import UsageError

            raise UsageError(f"--host {host} would let anyone who reaches this machine use the model: pass --api-key KEY "
                             "(or set FILA_API_KEY), or bind 127.0.0.1")
        options = CommandOptions(dict(model=model, llm=llm, mmproj=mmproj, fusion=fusion, device=device, dtype=dtype,
                                      gpu_layers=gpu_layers, ctx_size=ctx_size, template=template, cache=cache,
                                      verbose=verbose, cache_max_gb=cache_max_gb, compile_encoder=compile_encoder)).model()
        listener = bind_unix(socket_path) if socket_path is not None else bind_tcp(host, port)
        try:
            _run(listener, options, settings, shutdown_timeout, verbose, parallel)
        finally:
            listener.close()
            if socket_path is not None:
                socket_path.unlink(missing_ok=True)


def _run(listener, options: ModelOptions, settings, shutdown_timeout: float, verbose: bool, parallel: int) -> None:
    from fila_cli.serve.engine import Engine

    engine = Engine.load(options, timeout_s=settings.timeout_s, parallel=parallel, load_asker=load_asker)
    try:
        _listen(listener, engine, settings, shutdown_timeout, verbose)
    finally:
        engine.close()  # the server's threads have stopped (the app's lifespan joined them)


def _listen(listener, engine, settings, shutdown_timeout: float, verbose: bool) -> None:
    import uvicorn

    from fila_cli.serve.app import create_app
    from fila_cli.serve.listen import url_of

    app = create_app(engine, settings)
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=max(1, round(shutdown_timeout)), lifespan="on")
    server = uvicorn.Server(config)
    app.state.server.uvicorn = server
    stderr.print(f"fila serve: {engine.model_name} on {url_of(listener)} (pid {os.getpid()}; API page: /docs)",
                 highlight=False, soft_wrap=True)
    # uvicorn handles SIGTERM and Ctrl-C (drain, then exit) and raises the signal again afterwards:
    # SIGTERM's default action would then kill the process that just shut down cleanly.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[listener])
    finally:
        signal.signal(signal.SIGTERM, previous)
    stderr.print("fila serve: stopped", highlight=False)


def mount(app: typer.Typer) -> None:
    app.command(epilog=EXIT_CODES_HELP, short_help="Keep the model loaded; answer over HTTP (and OpenAI clients).")(serve)


# -- the CLI's side: --server and --keep-alive --


def server_args(options: ModelOptions) -> list[str]:
    """The ``fila serve`` options that load the model ``options`` name (paths made absolute)."""
    def path(value: Path | None) -> str | None:
        return None if value is None else str(Path(value).resolve())

    model = options.model or os.environ.get("FILA_MODEL")
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())
    pairs = [("--model", model), ("--llm", path(options.llm)), ("--mmproj", path(options.mmproj)),
             ("--fusion", path(options.fusion)), ("--device", options.device), ("--dtype", options.dtype),
             ("--gpu-layers", None if options.gpu_layers is None else str(options.gpu_layers)),
             ("--ctx-size", None if options.ctx_size is None else str(options.ctx_size)),
             ("--template", _template_arg(options.template)),
             ("--cache-max-gb", f"{options.cache_max_gb:g}")]
    args = [item for name, value in pairs if value is not None for item in (name, value)]
    if not options.use_cache:
        args.append("--no-cache")
    if options.compile_encoder:
        args.append("--compile")
    return args


def _template_arg(template: str | None) -> str | None:
    """--template as the server must see it: a family name as given, a jinja file made absolute."""
    if template is None or not Path(template).exists():
        return template
    return str(Path(template).resolve())


def remote_asker(options: ModelOptions, server: str | None, keep_alive: str | None):
    """An asker answered by ``server``, or by the keep-alive server for ``options`` (started if needed)."""
    from fila_cli.serve.client import RemoteAsker, ServerClient

    if server is None:
        from fila_cli.serve.keepalive import ensure_server, parse_duration

        seconds = parse_duration(keep_alive or "")
        with stderr.status("starting the keep-alive server…"):
            server = ensure_server(server_args(options), seconds)
    return RemoteAsker(ServerClient(server))


def run_remote_batch(server: str, documents: list[Path], questions: list[str], options, output: Path | None,
                     done: set, should_stop: Callable[[], bool] = lambda: False):
    """``fila batch --server``: every (document, question) not ``done`` asked of the server, one
    record each, written in order as ``fila batch`` writes them (two requests in flight, so the
    server renders the next document while its LLM answers this one). ``should_stop``: checked
    between records, as ``run_batch`` does (the records in flight are written whole)."""
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fila_cli.cli.support import warning_line
    from fila_cli.errors import FilaError
    from fila_cli.qa.batch import sha256_or_none
    from fila_cli.qa.records import failed_record
    from fila_cli.qa.run import BatchSummary, RecordSink, WarningReporter, unit_key
    from fila_cli.serve.client import RemoteAsker, ServerClient, ServerUnreachable

    asker = RemoteAsker(ServerClient(server))
    model_name = asker.model_name
    summary = BatchSummary()
    report_warnings = WarningReporter(warning_line)

    def answer(file: Path, sha256: str | None, question: str) -> dict:
        if sha256 is None:  # as the local batch says it (qa.batch)
            return failed_record(file, question, model_name, "document",
                                 f"{file}: no such file or not readable; check the path", sha256=None)
        try:
            return {**asker.ask_record(file, question, options, name=str(file)), "sha256": sha256}
        except ServerUnreachable:
            raise
        except FilaError as error:  # the server said why: the unit's record
            return failed_record(file, question, model_name, error.kind, str(error), sha256=sha256)

    units = []
    for file in documents:
        sha256 = sha256_or_none(file)
        for question in questions:
            if unit_key(file, sha256, question, model_name) in done:
                summary.skipped += 1
            else:
                units.append((file, sha256, question))
    sink = RecordSink(output)
    progress = Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=stderr, transient=True)
    in_flight = 2
    pool = ThreadPoolExecutor(in_flight)
    try:
        with progress:
            task = progress.add_task("batch", total=len(units))
            futures = [pool.submit(answer, *unit) for unit in units[:in_flight]]
            for index in range(len(units)):
                record = futures[index].result()
                sink.write(record)
                summary.count(record)
                report_warnings(record)
                progress.advance(task)
                if should_stop():  # after the record in flight, written whole; the next one is dropped
                    break
                if index + in_flight < len(units):
                    futures.append(pool.submit(answer, *units[index + in_flight]))
        summary.interrupted = should_stop()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a request still in flight: its unit is not done
        sink.close()
    return summary


def run_remote_chat(server: str, file: Path, options, document, talk) -> int:
    """``fila chat --server``: the conversation held by the server's chat session; ``talk`` is the
    piped or interactive loop ``fila chat`` runs locally."""
    from rich.text import Text

    from fila_cli.cli.support import warning_line
    from fila_cli.serve.client import RemoteChatSession, ServerClient

    with stderr.status("reading the page…"):
        session = RemoteChatSession(ServerClient(server), file, options, document)
    try:
        for notice in session.notices:
            stderr.print(Text(f"fila: {notice}", style="yellow"))
        for warning in session.warnings:
            warning_line(warning)
        return talk(session)
    finally:
        session.close()
