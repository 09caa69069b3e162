"""`fila weights` against a local Hub: download, resume, checksums, offline use, errors.

Whatever talks to the Hub runs the CLI in a subprocess with ``HF_ENDPOINT`` pointing at
tests/helpers/hub_server.py and ``HF_HOME`` in a temporary folder, as a user would run it (huggingface_hub
reads those variables at import time). What only reads the cache (info, list, verify, resolving)
runs in-process with huggingface_hub's cache directory pointed at the same folder. The served
files are tiny GGUFs written with gguf's writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from huggingface_hub import constants as hf_constants
from typer.testing import CliRunner

from fila_cli.bundles import hub
from fila_cli.bundles.bundle import resolve_bundle
from fila_cli.cli.weights import weights_app
from fila_cli.errors import ExitCode, ModelError
from tests.helpers.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "fila-test/tiny-bundle"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAME = "tiny"
# Larger than huggingface_hub's 10 MiB download chunk, so a cut at half leaves whole chunks on
# disk to resume from.
RESUME_TEST_FLOATS = 6 * 1024 * 1024  # 24 MiB of float32
SMALL_FLOATS = 4096
SUBPROCESS_TIMEOUT_S = 120
ERROR_PREFIX = "fila: error: "  # fila_cli.cli_support.error_line


def gguf_bytes(tmp_path: Path, architecture: str, n_floats: int, seed: int) -> bytes:
    path = tmp_path / f"build-{architecture}-{seed}.gguf"
    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("t.weight", np.random.default_rng(seed).standard_normal(n_floats, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.unlink()
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class TinyHub:
    server: HubServer
    env: dict[str, str]
    manifests: Path
    hf_home: Path
    tmp_path: Path

    def publish(
        self, llm: bytes, vision: bytes, *, manifest_llm_sha: str | None = None, llm_name: str = "llm.gguf"
    ) -> None:
        """Serve the files and write the 'tiny' manifest describing them."""
        self.server.add_file(REPO_ID, COMMIT, "llm.gguf", llm)
        self.server.add_file(REPO_ID, COMMIT, "mmproj.gguf", vision)
        manifest = {
            "name": NAME,
            "description": "tiny test bundle",
            "repo_id": REPO_ID,
            "revision": COMMIT,
            "files": {
                "llm": {"filename": llm_name, "sha256": manifest_llm_sha or sha256(llm), "size": len(llm)},
                "vision": {"filename": "mmproj.gguf", "sha256": sha256(vision), "size": len(vision)},
                "fusion": None,
            },
            "template": None,
            "n_ctx": 512,
            "max_visual_tokens": 100,
            "license": "mit",
        }
        (self.manifests / f"{NAME}.json").write_text(json.dumps(manifest))

    def snapshot(self, filename: str) -> Path:
        return self.hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT / filename

    def use_in_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process's huggingface_hub cache and fila's manifests at this hub's."""
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(self.hf_home / "hub"))
        monkeypatch.setenv("FILA_MANIFESTS", str(self.manifests))

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fila_cli.cli.weights", *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )


@pytest.fixture
def tiny_hub(tmp_path: Path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    hf_home = tmp_path / "hf-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FILA_"))}
    with HubServer() as server:
        env.update(
            HF_HOME=str(hf_home),
            HF_ENDPOINT=server.endpoint,
            HF_HUB_DISABLE_XET="1",  # plain HTTP: the local hub speaks no Xet
            HF_HUB_DISABLE_TELEMETRY="1",
            FILA_MANIFESTS=str(manifests),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )
        yield TinyHub(server, env, manifests, hf_home, tmp_path)


@pytest.fixture
def small_files(tmp_path: Path) -> tuple[bytes, bytes]:
    return gguf_bytes(tmp_path, "llama", SMALL_FLOATS, 1), gguf_bytes(tmp_path, "clip", SMALL_FLOATS, 2)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------


def test_pull_downloads_into_the_hf_cache(tiny_hub: TinyHub, small_files, monkeypatch: pytest.MonkeyPatch):
    llm, vision = small_files
    tiny_hub.publish(llm, vision)
    result = tiny_hub.run("pull", NAME)
    assert result.returncode == 0, result.stderr
    assert tiny_hub.snapshot("llm.gguf").read_bytes() == llm
    assert tiny_hub.snapshot("mmproj.gguf").read_bytes() == vision
    assert str(tiny_hub.snapshot("llm.gguf")) in result.stdout
    assert len(tiny_hub.server.gets("llm.gguf")) == 1 and len(tiny_hub.server.gets("mmproj.gguf")) == 1
    assert "llm.gguf" in result.stderr  # a progress bar per file, on stderr

    verified = tiny_hub.run("verify", NAME)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.count("ok ") == 2

    # What only reads the cache, in-process.
    tiny_hub.use_in_process(monkeypatch)
    runner = CliRunner()
    details = json.loads(runner.invoke(weights_app, ["info", NAME, "--json"]).stdout)
    assert details["installed"] is True and details["fusion_enabled"] is False
    assert details["fusion"] == hub.FUSION_OFF_MESSAGE
    assert {f["role"]: f["path"] for f in details["files"]} == {
        "llm": str(tiny_hub.snapshot("llm.gguf")),
        "vision": str(tiny_hub.snapshot("mmproj.gguf")),
    }
    listed = {b["name"]: b for b in json.loads(runner.invoke(weights_app, ["list", "--json"]).stdout)}
    assert listed[NAME]["installed"] is True and listed[NAME]["size"] == len(llm) + len(vision)
    assert listed["llava-1.6-mistral-7b"]["installed"] is False
    bundle = resolve_bundle(NAME)
    assert (bundle.llm, bundle.vision) == (tiny_hub.snapshot("llm.gguf"), tiny_hub.snapshot("mmproj.gguf"))
    assert (bundle.n_ctx, bundle.max_visual_tokens) == (512, 100)


def test_pull_resumes_a_cut_download(tiny_hub: TinyHub, small_files, tmp_path: Path):
    llm = gguf_bytes(tmp_path, "llama", RESUME_TEST_FLOATS, 3)
    tiny_hub.publish(llm, small_files[1])
    cut_fraction = 0.5
    tiny_hub.server.cut_next_get["llm.gguf"] = cut_fraction
    result = tiny_hub.run("pull", NAME, "--no-progress")
    assert result.returncode == 0, result.stderr
    first, second = tiny_hub.server.gets("llm.gguf")
    assert "range" not in first.headers
    start = int(second.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= int(len(llm) * cut_fraction)  # resumed, not restarted
    assert tiny_hub.snapshot("llm.gguf").read_bytes() == llm


def test_checksum_mismatch_is_refused_and_nothing_deleted(tiny_hub: TinyHub, small_files):
    llm, vision = small_files
    promised = sha256(b"what the manifest promised")
    tiny_hub.publish(llm, vision, manifest_llm_sha=promised)
    result = tiny_hub.run("pull", NAME)
    assert result.returncode == ExitCode.MODEL
    line = error_line(result)
    assert line.startswith(f"{ERROR_PREFIX}checksum mismatch for ") and "llm.gguf" in line
    assert f"expected {promised}, got {sha256(llm)}" in line
    assert line.endswith(f"run `fila weights pull {NAME} --force`")
    assert tiny_hub.snapshot("llm.gguf").read_bytes() == llm  # kept for the user to inspect


def test_local_corruption_is_caught_and_force_downloads_again(
    tiny_hub: TinyHub, small_files, monkeypatch: pytest.MonkeyPatch
):
    llm, vision = small_files
    tiny_hub.publish(llm, vision)
    assert tiny_hub.run("pull", NAME).returncode == 0
    blob = tiny_hub.snapshot("llm.gguf").resolve()
    blob.write_bytes(llm[:-8] + b"\0" * 8)  # same size, different bytes

    # In-process: verify hashes the cache; pull finds the cached file (no network) and refuses it.
    tiny_hub.use_in_process(monkeypatch)
    report = hub.verify(NAME, progress=False)
    assert [c.status for c in report.files] == ["mismatch", "ok"]
    with pytest.raises(ModelError, match=f"checksum mismatch for .*llm.gguf.*pull {NAME} --force"):
        hub.pull(NAME, progress=False)
    assert len(tiny_hub.server.gets("llm.gguf")) == 1

    forced = tiny_hub.run("pull", NAME, "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(tiny_hub.server.gets("llm.gguf")) == 2
    assert tiny_hub.snapshot("llm.gguf").read_bytes() == llm
    assert hub.verify(NAME, progress=False).ok


def test_offline_uses_the_cache(tiny_hub: TinyHub, small_files, tmp_path: Path):
    llm, vision = small_files
    tiny_hub.publish(llm, vision)
    assert tiny_hub.run("pull", NAME).returncode == 0
    requests_before = len(tiny_hub.server.requests)

    offline = tiny_hub.run("pull", NAME, HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert str(tiny_hub.snapshot("llm.gguf")) in offline.stdout
    assert len(tiny_hub.server.requests) == requests_before  # nothing went to the network

    empty = tiny_hub.run("pull", NAME, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-home"))
    assert empty.returncode == ExitCode.MODEL
    assert "HF_HUB_OFFLINE is set" in error_line(empty)


def test_missing_remote_file_is_one_line(tiny_hub: TinyHub, small_files):
    llm, vision = small_files
    tiny_hub.publish(llm, vision, llm_name="absent.gguf")
    missing = tiny_hub.run("pull", NAME)
    assert missing.returncode == ExitCode.MODEL
    assert error_line(missing) == (
        f"{ERROR_PREFIX}file absent.gguf of {REPO_ID}@{COMMIT} not found on {tiny_hub.server.endpoint}; "
        "is the manifest right?"
    )
    # An unreachable endpoint is not tested here: huggingface_hub retries it for ~25 s.


def test_unknown_name_in_process(tiny_hub: TinyHub, small_files, monkeypatch: pytest.MonkeyPatch):
    tiny_hub.publish(*small_files)
    tiny_hub.use_in_process(monkeypatch)
    result = CliRunner().invoke(weights_app, ["pull", "no-such-model"])
    assert result.exit_code == ExitCode.MODEL
    assert result.stderr.startswith(f"{ERROR_PREFIX}unknown model 'no-such-model'") and NAME in result.stderr


# --------------------------------------------------------------------------------------------
# Local bundle directories (no hub involved)
# --------------------------------------------------------------------------------------------


def write_dir_bundle(directory: Path, llm: bytes, vision: bytes, *, llm_sha: str | None) -> Path:
    directory.mkdir()
    (directory / "lm.gguf").write_bytes(llm)
    (directory / "proj.gguf").write_bytes(vision)
    (directory / "bundle.json").write_text(
        json.dumps(
            {"name": "local", "files": {"llm": {"filename": "lm.gguf", "sha256": llm_sha}, "vision": "proj.gguf"}}
        )
    )
    return directory


def test_verify_and_info_of_a_directory_bundle(tmp_path: Path, small_files):
    llm, vision = small_files
    good = write_dir_bundle(tmp_path / "good", llm, vision, llm_sha=sha256(llm))
    report = hub.verify(str(good), progress=False)
    assert report.ok and [c.status for c in report.files] == ["ok", "unchecked"]

    details = hub.info(str(good))
    assert details.installed and not details.fusion_enabled and details.fusion == hub.FUSION_OFF_MESSAGE
    assert [(f.role, f.size) for f in details.files] == [("llm", len(llm)), ("vision", len(vision))]

    bad = write_dir_bundle(tmp_path / "bad", llm, vision, llm_sha=sha256(b"other"))
    report = hub.verify(str(bad), progress=False)
    assert not report.ok and report.files[0].status == "mismatch"
    with pytest.raises(ModelError, match="checksum mismatch for .*lm.gguf"):
        report.raise_for_failure()

    swapped = write_dir_bundle(tmp_path / "swapped", vision, llm, llm_sha=None)
    statuses = [c.status for c in hub.verify(str(swapped), progress=False).files]
    assert statuses == ["invalid", "invalid"]


def test_cli_info_json_and_exit_codes_in_process(tmp_path: Path, small_files):
    llm, vision = small_files
    bundle = write_dir_bundle(tmp_path / "b", llm, vision, llm_sha=None)
    runner = CliRunner()
    result = runner.invoke(weights_app, ["info", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "local"
    failed = runner.invoke(weights_app, ["info", str(tmp_path / "nowhere")])
    assert failed.exit_code == ExitCode.MODEL
    assert failed.stderr.startswith(f"{ERROR_PREFIX}bundle directory not found")


def test_progress_stand_in_fits_huggingface_hubs_xet_reporter():
    """Xet downloads (most Hub files today) drive the bar through huggingface_hub's reporter;
    the stand-in must take what it calls. No Xet server here, so the reporter is fed directly."""
    reporting = pytest.importorskip("huggingface_hub.utils._xet_progress_reporting")
    bars = hub.ByteProgress(enabled=False)
    task = bars.add("x", None)
    reporter = reporting.XetDownloadProgressReporter(
        reconstruction_desc="x", total=None, log_level=0, tqdm_class=bars.tqdm_class(task)
    )

    @dataclass
    class Report:  # the fields of hf_xet's group progress report that the reporter reads
        total_bytes: int
        total_bytes_completed: int
        total_bytes_completion_rate: float
        total_transfer_bytes_completed: int
        total_transfer_bytes_completion_rate: float

    with reporter:
        reporter.update_progress(Report(1000, 400, 1.0, 300, 1.0))
        reporter.update_progress(Report(1000, 1000, 1.0, 700, 1.0))
    state = bars.progress.tasks[0]
    assert (state.total, state.completed) == (1000, 1000)
