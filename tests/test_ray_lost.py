"""Issue 24 item 4: a Ray cluster lost mid-batch (its node's agent, the raylet, killed) is reported
as such: one line naming the failure, the count of records not written, and the --resume command.

Not done yet (xfail, strict): when its raylet dies, Ray's core worker ends the driver process from
C++ (exit 1, no Python exception, no handler runs), so `fila batch --ray` cannot say anything from
inside that process. Reporting it needs a supervising parent (see the cli branch's notes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.tiny_bundle import build_tiny_bundle

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.xfail(strict=True, reason="the driver is ended by Ray's core worker when its raylet dies")
def test_a_lost_cluster_says_what_is_missing_and_how_to_resume(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "bundle")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(9):
        make_good_pdf(docs / f"d{i}.pdf", [f"Invoice {i}: the total due is {i * 10} EUR."])
    temp, port = tmp_path / "ray", free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard", "false", "--object-store-memory", str(200 * 1024**2), "--temp-dir", str(temp),
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180, env=env)
    out = tmp_path / "out.jsonl"
    try:
        driver = subprocess.Popen([sys.executable, "-m", "fila_cli", "batch", str(docs), "-q", "Total?", "-q", "Who?",
                                   "--model", str(bundle), "--max-tokens", "2", "--ray", f"127.0.0.1:{port}",
                                   "--ray-cpus", "1", "-o", str(out)], stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 600
        while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.5)
        raylet = subprocess.run(["pgrep", "-f", f"raylet.*{temp}"], capture_output=True, text=True).stdout.split()
        assert raylet, "the node's raylet should be running"
        os.kill(int(raylet[0]), signal.SIGKILL)
        _, stderr = driver.communicate(timeout=600)
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120, env=env)
    written = len(out.read_text().splitlines())
    lines = [line for line in stderr.splitlines() if line.startswith("fila: error:")]
    assert driver.returncode == 1 and lines, stderr[-2000:]
    assert "Ray cluster was lost" in lines[-1] and f"{18 - written} of 18 records not written" in lines[-1]
    assert "--resume" in lines[-1]
