"""The supervised driver process of `fila batch --ray` (fila_cli/cli/ray_driver.py), with real
processes: a driver ended without a word is reported by its parent with the records it owed, the
parent's signals reach it, and it dies with its parent. (The lost Ray cluster itself, through the
CLI: tests/test_ray_lost.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fila_cli.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]


def ended_by_the_backend(status) -> int:
    """As Ray's core worker ends a driver whose raylet died: no exception, no handler, exit 1."""
    status.total.value, status.written.value = 18, 2
    os._exit(1)


def finished(status) -> int:
    status.total.value, status.written.value = 3, 3
    return 7


def waits_for_a_stop(status) -> int:
    from fila_cli.cli.stopping import stop_signals

    with stop_signals() as stop:
        Path(os.environ["FILA_TEST_PID_FILE"]).write_text(str(os.getpid()))
        while not stop.requested():
            time.sleep(0.05)
        return stop.exit_code


def supervisor(run: str, tmp_path: Path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import sys
        from fila_cli.cli.ray_driver import supervise
        from tests.test_ray_driver import {run}
        sys.exit(supervise({run}, lambda missing, total, cause: f"{{missing}} of {{total}} not written ({{cause}})"))
    """)
    env = {**os.environ, "FILA_TEST_PID_FILE": str(tmp_path / "child.pid"), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def child_pid(tmp_path: Path, parent: subprocess.Popen) -> int:
    pid_file = tmp_path / "child.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read()
        time.sleep(0.05)
    return int(pid_file.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def test_a_driver_ended_without_a_word_is_reported_by_its_parent(tmp_path):
    parent = supervisor("ended_by_the_backend", tmp_path)
    _, stderr = parent.communicate(timeout=120)
    assert parent.returncode == ExitCode.FAILURE
    assert stderr.strip().splitlines()[-1] == (
        "fila: error: 16 of 18 not written (the driver process exited with status 1 before the batch finished)")


def test_a_driver_that_finishes_gives_its_exit_code_and_no_error_line(tmp_path):
    parent = supervisor("finished", tmp_path)
    _, stderr = parent.communicate(timeout=120)
    assert parent.returncode == 7 and "error" not in stderr


def test_sigterm_to_the_command_reaches_the_driver_once(tmp_path):
    parent = supervisor("waits_for_a_stop", tmp_path)
    child_pid(tmp_path, parent)
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == ExitCode.TERMINATED, stderr  # the driver's own exit path: a stop, not a loss
    assert "error" not in stderr


def test_the_driver_dies_with_a_killed_command(tmp_path):
    parent = supervisor("waits_for_a_stop", tmp_path)
    driver = child_pid(tmp_path, parent)
    parent.kill()
    parent.wait(timeout=60)
    deadline = time.monotonic() + 30
    while alive(driver) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(driver), "a kill -9 on the command must not leave its driver writing records"
