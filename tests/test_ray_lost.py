"""Issue 24 item 4: a Ray cluster lost mid-batch (its node's agent, the raylet, killed) is reported
as such: one line naming the failure, the count of records not written, and the --resume command.

When its raylet dies, Ray's core worker ends the driver process from C++ (exit 1, no Python
exception, no handler runs); the command's own process supervises the driver and says it
(fila_cli/cli/ray_driver.py)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
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


def start_head(port: int, temp: Path, env: dict) -> None:
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard", "false", "--object-store-memory", str(200 * 1024**2), "--temp-dir", str(temp),
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180, env=env)


@pytest.mark.timeout(1800)  # two cluster starts and two batches: minutes on a loaded 2-core machine
def test_a_lost_cluster_says_what_is_missing_and_how_to_resume(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "bundle")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(9):
        make_good_pdf(docs / f"d{i}.pdf", [f"Invoice {i}: the total due is {i * 10} EUR."])
    # Ray's socket paths must stay under 108 bytes: a short folder, not the test's long tmp_path.
    temp, port = Path(tempfile.mkdtemp(prefix="fila-ray-")), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = tmp_path / "out.jsonl"
    try:
        start_head(port, temp, env)
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
        written = len(out.read_text().splitlines())
        lines = [line for line in stderr.splitlines() if line.startswith("fila: error:")]
        assert driver.returncode == 1 and lines, stderr[-2000:]
        assert "Ray cluster was lost" in lines[-1] and f"{18 - written} of 18 records not written" in lines[-1]

        # The command the line gives finishes the job, once the cluster is back.
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120, env=env)
        start_head(port, temp, env)
        resume = shlex.split(lines[-1].split("finish them with: ", 1)[1])
        assert resume[0] == "fila" and resume[-1] == "--resume"
        completed = subprocess.run([sys.executable, "-m", "fila_cli", *resume[1:]], capture_output=True, text=True,
                                   timeout=600, env=env)
        assert completed.returncode == 0, completed.stderr[-2000:]
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)
    units = Counter((r["file"], r["question"]) for r in map(json.loads, out.read_text().splitlines()))
    assert len(units) == 18 and set(units.values()) == {1}, "every record, each exactly once"
