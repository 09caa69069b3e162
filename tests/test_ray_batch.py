"""`fila batch --ray` on a real local Ray cluster (127.0.0.1, started here and stopped after), tiny bundle,
real llama.cpp: the same records as a local batch, each exactly once, across a killed worker and a
killed driver."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fila_cli.errors import ExitCode
from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.tiny_vision import page_image
from tests.test_batch_pipeline import PORTRAIT, WIDE, shaped_pdf

pytest.importorskip("ray")

QUESTIONS = ["What is the total due?", "Who signed the letter?"]
RAY = Path(sys.executable).with_name("ray")
ACTOR_CLASS = "DocumentAnswerer"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node cluster with 2 CPUs on loopback: 2 workers at --ray-cpus 1."""
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    # Loopback only, started and stopped here: no token to hand around (the drivers inherit this).
    previous_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    environment = dict(os.environ)
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard", "false", "--object-store-memory", str(200 * 1024**2), "--temp-dir", str(temp),
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180, env=environment)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)
        if previous_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 documents: 9 good (PDFs and a PNG), one encrypted, one empty, one not a PDF."""
    import pymupdf

    folder = tmp_path_factory.mktemp("inbox")
    for i in range(8):
        make_good_pdf(folder / f"doc{i:02d}.pdf", [f"Invoice {i}: the total due is {i * 10} EUR. Signed Ada."])
    page_image(500, 400).save(folder / "scan.png")
    locked = pymupdf.open(folder / "doc00.pdf")
    locked.save(folder / "locked.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="secret", owner_pw="secret")
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "notes.pdf").write_text("a text file with a .pdf name")
    return folder


def batch_command(bundle, *args):
    return [sys.executable, "-m", "fila_cli", "batch", *map(str, args), "--model", str(bundle), "--max-tokens", "4"]


def ray_command(bundle, cluster, *args):
    return batch_command(bundle, *args, "--ray", cluster, "--ray-cpus", "1")


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_unit(records):
    keys = Counter((r["file"], r["question"]) for r in records)
    assert set(keys.values()) == {1}, "each (document, question) exactly once"
    return {(r["file"], r["question"]): r for r in records}


@pytest.mark.slow
def test_the_cluster_gives_the_local_records_each_once(bundle, cluster, folder, tmp_path):
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    questions = ["-q", QUESTIONS[0], "-q", QUESTIONS[1]]
    subprocess.run(batch_command(bundle, folder, *questions, "-o", local), capture_output=True, timeout=600)
    completed = subprocess.run(ray_command(bundle, cluster, folder, *questions, "-o", remote),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.FAILURE, completed.stderr  # three bad documents
    assert "Traceback" not in completed.stderr
    assert "18 answered; 6 failed" in completed.stderr
    expected, got = by_unit(read_records(local)), by_unit(read_records(remote))
    assert len(got) == 12 * 2 and got.keys() == expected.keys()
    for unit, record in got.items():
        reference = expected[unit]
        assert record["sha256"] == reference["sha256"] and record["model"] == reference["model"]
        if reference["error"] is None:
            assert record["error"] is None and record["answer"] == reference["answer"], unit
            assert record["pages"] == reference["pages"]
        else:
            assert record["error"]["kind"] == reference["error"]["kind"], unit


def without_timings(records):
    return {unit: {key: value for key, value in record.items() if key != "timings"} for unit, record in by_unit(records).items()}


@pytest.mark.slow
def test_an_overlapped_worker_gives_the_records_of_one_stage_at_a_time(bundle, cluster, tmp_path):
    """One worker (--ray-cpus 2 of the cluster's 2) with --pipeline-depth 2: four documents in its
    pipeline at once, pages of the next rendered and encoded while its LLM answers; no cache, so
    every page goes through every stage. The records are the local one-stage-at-a-time batch's."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        make_good_pdf(folder / f"scan{i}.pdf", [f"Scan {i}: the total due is {i * 10} EUR."], scanned_page=0)
    shaped_pdf(folder / "shapes.pdf", [WIDE, PORTRAIT, WIDE])  # no text layer: all three pages read
    make_good_pdf(folder / "letter.pdf", ["Dear Ada,", "the total due is 12 EUR. Signed Bob."])
    (folder / "broken.pdf").write_text("a text file with a .pdf name")
    questions = ["-q", QUESTIONS[0], "-q", QUESTIONS[1], "--no-cache"]
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    subprocess.run(batch_command(bundle, folder, *questions, "-o", local, "--pipeline-depth", "0"),
                   capture_output=True, timeout=600)
    completed = subprocess.run(batch_command(bundle, folder, *questions, "-o", remote, "--ray", cluster,
                                             "--ray-cpus", "2", "--pipeline-depth", "2"),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.FAILURE, completed.stderr  # the broken document
    assert "10 answered; 2 failed" in completed.stderr and "Traceback" not in completed.stderr
    got, expected = without_timings(read_records(remote)), without_timings(read_records(local))
    assert len(got) == 6 * 2 and got == expected
    shapes = [record for (file, _), record in got.items() if file.endswith("shapes.pdf")]
    assert [record["error"] for record in shapes] == [None, None]  # the premise: a three-page document answered


def actor_pids() -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [int(line.split()[0]) for line in listing if ACTOR_CLASS in line and "ps -eo" not in line]


def wait_for(predicate, process, deadline_s=300):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if predicate():
            return
        assert process.poll() is None, "the batch ended too soon"
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_its_documents_retried(bundle, cluster, folder, tmp_path):
    """Killed while its stages overlap (--pipeline-depth 1: three documents in each worker's pipeline)."""
    out = tmp_path / "out.jsonl"
    good = sorted(folder.glob("doc*.pdf"))
    process = subprocess.Popen(ray_command(bundle, cluster, *good, "-q", QUESTIONS[0], "-q", QUESTIONS[1], "-o", out,
                                           "--pipeline-depth", "1", "--no-cache"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: out.exists() and out.read_text().count("\n") >= 2, process)
    victims = actor_pids()
    assert victims, "no fila worker process found"
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == ExitCode.OK, stderr
    records = read_records(out)
    assert len(by_unit(records)) == len(good) * 2 and all(r["error"] is None for r in records)
    assert "restarted" in stderr.strip().splitlines()[-1], stderr


@pytest.mark.slow
def test_kill_9_on_the_driver_then_resume(bundle, cluster, folder, tmp_path):
    """With --pipeline-depth 0 (one stage at a time, a document per worker call): that path runs too."""
    out = tmp_path / "out.jsonl"
    command = ray_command(bundle, cluster, folder, "-q", QUESTIONS[0], "-q", QUESTIONS[1], "-o", out, "--pipeline-depth", "0")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: out.exists() and out.read_text().count("\n") >= 3, process)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and what it started
    process.wait(timeout=60)
    with open(out, "a") as handle:
        handle.write('{"file": "torn')  # a kill in the middle of a write
    completed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.FAILURE, completed.stderr  # the three bad documents, again
    records = read_records(out)
    assert len(by_unit(records)) == 12 * 2, "nothing lost, nothing duplicated"
    assert sum(r["error"] is not None for r in records) == 3 * 2


def warning_lines(stderr: str) -> list[str]:
    return sorted(line for line in stderr.splitlines() if line.startswith("fila: warning: "))


@pytest.mark.slow
def test_damaged_documents_are_warned_about_on_stderr_as_a_local_batch_does(bundle, cluster, tmp_path):
    from tests.helpers.bad_documents import write_corpus

    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    (tmp_path / "docs").mkdir()
    for name in ("truncated_tail.pdf", "bit_flipped.pdf"):
        shutil.copy(corpus / name, tmp_path / "docs" / name)
    make_good_pdf(tmp_path / "docs" / "good.pdf", ["The total due is 42 EUR. Signed Ada."])
    # Paths as a user types them, relative: the warnings name them so, on every node.
    names = ["docs/truncated_tail.pdf", "docs/bit_flipped.pdf", "docs/good.pdf"]
    arguments = [*names, "-q", QUESTIONS[0], "-q", QUESTIONS[1], "--pages", "1"]
    local = subprocess.run(batch_command(bundle, *arguments, "-o", "local.jsonl"), cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    remote = subprocess.run(ray_command(bundle, cluster, *arguments, "-o", "ray.jsonl"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert local.returncode == remote.returncode == ExitCode.OK, remote.stderr
    said = warning_lines(remote.stderr)
    assert said == warning_lines(local.stderr) and len(said) == 2, remote.stderr  # once per damaged document
    assert ("fila: warning: docs/truncated_tail.pdf was damaged and repaired; some content may be missing" in said
            and any(line.startswith("fila: warning: docs/bit_flipped.pdf could not be read entirely") for line in said))
    expected, got = by_unit(read_records(tmp_path / "local.jsonl")), by_unit(read_records(tmp_path / "ray.jsonl"))
    assert {unit: r["warnings"] for unit, r in got.items()} == {unit: r["warnings"] for unit, r in expected.items()}


BLOCK_RAY = """
import sys
sys.modules["ray"] = None  # as if the extra were not installed
from fila_cli.cli.app import main
sys.argv = ["fila", *sys.argv[1:]]
main()
"""


def test_ray_without_the_extra_names_the_install_command(bundle, folder):
    completed = subprocess.run([sys.executable, "-c", BLOCK_RAY, "batch", str(folder / "doc01.pdf"), "-q", "q",
                                "--model", str(bundle), "--ray", "auto"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == ExitCode.USAGE
    assert completed.stderr.strip() == 'fila: error: --ray needs Ray: pip install "fila-cli[ray]"'


RUN_LOCAL_BATCH = """
import contextlib, sys
from fila_cli.cli.app import app
with contextlib.suppress(SystemExit):
    app(sys.argv[1:])
print("RAY LOADED" if "ray" in sys.modules else "NO RAY", file=sys.stderr)
"""


def test_without_ray_the_batch_never_imports_it(bundle, folder):
    completed = subprocess.run([sys.executable, "-c", RUN_LOCAL_BATCH, "batch", str(folder / "doc01.pdf"), "-q", "q",
                                "--model", str(bundle), "--max-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert completed.stderr.strip().endswith("NO RAY"), completed.stderr


@pytest.mark.slow
def test_two_given_paths_of_one_file_are_two_documents(bundle, cluster, tmp_path):
    """A file and a link to it resolve to one path on the workers; the driver keeps them apart."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    make_good_pdf(folder / "a.pdf", ["The total due is 310.00 EUR"])
    os.symlink(folder / "a.pdf", folder / "link.pdf")
    out = tmp_path / "out.jsonl"
    completed = subprocess.run(ray_command(bundle, cluster, folder / "a.pdf", folder / "link.pdf", "-q", QUESTIONS[0],
                                           "-o", out, "--pipeline-depth", "0"), capture_output=True, text=True, timeout=600)
    assert completed.returncode == ExitCode.OK, completed.stderr
    records = read_records(out)
    assert sorted(r["file"] for r in records) == [str(folder / "a.pdf"), str(folder / "link.pdf")]
    assert all(r["error"] is None for r in records)


def holds_open(pid: int, path: Path) -> bool:
    """Whether the process ``pid`` or one of its children (its document worker) has ``path`` open."""
    import psutil

    try:
        process = psutil.Process(pid)
        return any(Path(f.path) == path for p in (process, *process.children(recursive=True)) for f in p.open_files())
    except psutil.Error:  # gone, or going, while we looked
        return False


@pytest.mark.slow
def test_a_document_that_kills_its_worker_twice_is_recorded_as_crash(bundle, cluster, tmp_path):
    """The README's promise: a worker that dies is replaced and its document retried once; a document
    on which the worker dies again comes back as a ``crash`` record, and the other documents are answered.
    The document "kills" its worker here because a watcher SIGKILLs any worker that has it open."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(3):
        make_good_pdf(inbox / f"doc{i}.pdf", [f"Invoice {i}: the total due is {i * 10} EUR."])
    killer = make_good_pdf(inbox / "killer.pdf", ["A page no worker survives."]).resolve()
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen(ray_command(bundle, cluster, inbox, "-q", QUESTIONS[0], "-o", out, "--pipeline-depth", "0",
                                           "--no-cache"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kills = 0
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        for pid in actor_pids():
            if holds_open(pid, killer):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=60)
    assert kills >= 2, stderr  # the premise: the worker died on it, and again on the retry
    records = by_unit(read_records(out))
    assert len(records) == 4
    crashed = [r for (file, _), r in records.items() if Path(file).name == "killer.pdf"]
    assert [r["error"]["kind"] for r in crashed] == ["crash"] and "died twice" in crashed[0]["error"]["message"]
    assert all(r["error"] is None for (file, _), r in records.items() if Path(file).name != "killer.pdf")
    assert process.returncode == ExitCode.FAILURE and "Traceback" not in stderr
