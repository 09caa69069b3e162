"""A real `fila serve` process for the tests: started on a free loopback port (or a Unix socket),
waited for until /health answers, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    def __init__(self, bundle: Path, *args, cache_dir: Path, socket_path: Path | None = None, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None):
        self.socket_path = socket_path
        self.port = None if socket_path is not None else free_port()
        where = ["--socket", str(socket_path)] if socket_path is not None else ["--host", host, "--port", str(self.port)]
        self.log = cache_dir.parent / f"serve-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log_file = open(self.log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fila_cli", "serve", "--model", str(bundle), *where, *map(str, args)],
            stdout=self._log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "FILA_CACHE_DIR": str(cache_dir), **(env or {})})
        self.url = f"unix:{socket_path}" if socket_path is not None else f"http://127.0.0.1:{self.port}"
        self.base_url = "http://fila" if socket_path is not None else self.url

    def client(self, **kwargs) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket_path)) if self.socket_path is not None else None
        return httpx.Client(base_url=self.base_url, transport=transport, timeout=kwargs.pop("timeout", 120.0), **kwargs)

    def wait_ready(self, headers: dict[str, str] | None = None) -> ServeProcess:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with self.client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"fila serve exited with {self.process.returncode}: {self.output()}")
                try:
                    if client.get("/health", headers=headers).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"fila serve did not start: {self.output()}")

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode
