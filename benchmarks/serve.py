"""`fila serve`: what keeping the model loaded saves, and what the server sustains.

The model is ``end_to_end.py``'s (full-size CLIP ViT-L/14-336 mmproj, f16, fusion off; the
Mistral-7B-shaped Q4_K_M GGUF), or with ``--small`` a tiny one (the whole script in a minute).
Rows, each from real processes (the CLI, ``fila serve``, HTTP clients):

- cold ``fila ask``: a fresh process, empty caches, no server: its wall time;
- ``fila ask --keep-alive``, second ask on another document: its wall time (the first ask started
  the server and paid the load);
- through the server: the first token of a first question on a new page, and of a second question
  on the same page (its prefix state reused: only the question is decoded);
- pages/min over ``--pages`` one-page documents with 1, 2 and 4 concurrent clients, against
  ``fila batch`` on as many (caches on, as users run fila, but every timed page new: each row
  reads its own documents);
- the server's peak RSS (its process and its document worker, VmHWM).

Usage: python benchmarks/serve.py [--small] [--pages 8] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

QUESTION = "What is the total due?"
FOLLOW_UP = "Who issued the invoice?"
STARTUP_TIMEOUT_S = 1800.0


def fila(*args, env: dict[str, str], timeout: float = 7200) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "fila_cli", *map(str, args)], capture_output=True, text=True,
                               env={**os.environ, **env}, timeout=timeout)
    if completed.returncode not in (0,):
        raise SystemExit(f"fila {' '.join(map(str, args))} failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return time.perf_counter() - started, completed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """VmHWM of ``pid`` and its children (the document worker), in MB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def first_token_s(client, path: Path, question: str, max_tokens: int) -> tuple[float, dict]:
    """Seconds from sending the request to the first streamed delta, and the record."""
    started = time.perf_counter()
    first = None
    record = None
    with open(path, "rb") as handle, client.stream(
            "POST", "/v1/ask", data={"question": question, "stream": "true", "max_tokens": str(max_tokens), "pages": "1"},
            files={"file": (path.name, handle)}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line:
                continue
            item = json.loads(line)
            if first is None:
                first = time.perf_counter() - started
            record = item.get("record", record)
    return first, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the tiny model: the whole script in about a minute")
    parser.add_argument("--pages", type=int, default=8, help="one-page documents for the pages/min rows")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    import httpx
    from end_to_end import a4_pdf, bundle_dir

    bundle = bundle_dir(args.small)
    work = Path(tempfile.mkdtemp(prefix="fila-serve-bench-"))
    # Every page is new where it is read: three for the asks, then a set of --pages for each pages/min row
    # and for `fila batch`, so the caches (on, as users run fila) never answer a page that is timed.
    documents = [a4_pdf(work / f"invoice-{i}.pdf", label=f"No. {1000 + i}") for i in range(3 + 4 * args.pages)]
    page_sets = [documents[3 + k * args.pages: 3 + (k + 1) * args.pages] for k in range(4)]
    rows: list[tuple[str, str]] = []
    tokens = ["--max-tokens", args.max_tokens]
    env = {"PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(work / "run")}
    (work / "run").mkdir(mode=0o700)

    cold_s, _ = fila("ask", documents[0], QUESTION, "--model", bundle, "--json", *tokens,
                     env={**env, "FILA_CACHE_DIR": str(work / "cold-cache")})
    rows.append(("cold `fila ask` (fresh process, empty caches)", f"{cold_s:.1f} s"))

    keep_env = {**env, "FILA_CACHE_DIR": str(work / "keep-cache"), "FILA_KEEP_ALIVE": "10m"}
    first_keep_s, _ = fila("ask", documents[1], QUESTION, "--model", bundle, "--json", *tokens, env=keep_env)
    second_keep_s, _ = fila("ask", documents[2], QUESTION, "--model", bundle, "--json", *tokens, env=keep_env)
    rows.append(("`fila ask --keep-alive`, first ask (starts the server)", f"{first_keep_s:.1f} s"))
    rows.append(("`fila ask --keep-alive`, second ask, another document",
                 f"{second_keep_s:.1f} s ({cold_s - second_keep_s:.1f} s less than the cold ask)"))
    for sock in (work / "run" / "fila").glob("serve-*.sock"):
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://fila") as client:
            os.kill(client.get("/health").json()["pid"], signal.SIGTERM)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fila_cli", "serve", "--model", str(bundle), "--port", str(port),
                               "--max-queue", "64"],
                              env={**os.environ, **env, "FILA_CACHE_DIR": str(work / "serve-cache")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=7200) as client:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("fila serve did not start") from None
                    time.sleep(0.5)
            # The second question finds the page's visual tokens in the token cache and its prefix state
            # in memory: only the question is decoded (with --no-cache the page would be encoded again).
            new_page_s, _ = first_token_s(client, documents[0], QUESTION, args.max_tokens)
            same_page_s, _ = first_token_s(client, documents[0], FOLLOW_UP, args.max_tokens)
        rows.append(("server: first token, first question on a new page", f"{new_page_s:.2f} s"))
        rows.append(("server: first token, second question on the same page",
                     f"{same_page_s:.3f} s ({100 * same_page_s / new_page_s:.1f} % of the new page's; "
                     f"{100 * same_page_s / cold_s:.2f} % of the cold ask)"))
        for n_clients, pages in zip((1, 2, 4), page_sets):
            rate = pages_per_minute(url, pages, n_clients, args.max_tokens)
            rows.append((f"server: pages/min, {n_clients} concurrent client{'s' if n_clients > 1 else ''}", f"{rate:.1f}"))
        rows.append(("server: peak RSS (server + document worker)", f"{peak_rss_mb(server.pid):,.0f} MB"))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    pages = page_sets[3]
    batch_s, _ = fila("batch", *pages, "-q", QUESTION, "--model", bundle, *tokens, "--pages", 1,
                      env={**env, "FILA_CACHE_DIR": str(work / "batch-cache")})
    rows.append(("`fila batch`, as many new pages (one process, load included)", f"{60 * len(pages) / batch_s:.1f} pages/min"))

    width = max(len(name) for name, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


def pages_per_minute(url: str, pages: list[Path], n_clients: int, max_tokens: int) -> float:
    import httpx

    queue = list(pages)
    lock = threading.Lock()

    def client_loop(_: int) -> None:
        with httpx.Client(base_url=url, timeout=7200) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    path = queue.pop(0)
                with open(path, "rb") as handle:
                    response = client.post("/v1/ask", data={"question": QUESTION, "max_tokens": str(max_tokens),
                                                            "pages": "1"}, files={"file": (path.name, handle)})
                response.raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(client_loop, range(n_clients)))
    return 60 * len(pages) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
