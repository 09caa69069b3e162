"""Bundles: manifests, local bundle directories, explicit paths and the not-installed errors.

Tiny GGUF files are written with gguf's own writer; the LLM/mmproj split is read back from
their metadata, never from their names.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from huggingface_hub import constants as hf_constants

from fila_cli.bundles import bundle as bundles
from fila_cli.bundles.bundle import (
    DEFAULT_MODEL,
    MANIFESTS_ENV,
    MODEL_ENV,
    Manifest,
    get_manifest,
    load_manifests,
    read_gguf_header,
    resolve_bundle,
)
from fila_cli.errors import ExitCode, ModelError
from fila_cli.llm.templates import FAMILIES

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_gguf(path: Path, architecture: str, *, file_type: str | None = None) -> Path:
    writer = GGUFWriter(str(path), architecture)
    if file_type is not None:
        writer.add_type(file_type)
    writer.add_tensor("t.weight", np.arange(16, dtype=np.float32).reshape(4, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache, no $FILA_MODEL, and one extra manifest 'tiny' (not installed)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(MODEL_ENV, raising=False)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "tiny.json").write_text(
        json.dumps(
            {
                "name": "tiny",
                "description": "test bundle",
                "repo_id": "fila-test/tiny",
                "revision": "0" * 40,
                "files": {
                    "llm": {"filename": "llm.gguf", "sha256": None, "size": None},
                    "vision": {"filename": "mmproj.gguf", "sha256": None, "size": None},
                    "fusion": None,
                },
                "template": None,
            }
        )
    )
    monkeypatch.setenv(MANIFESTS_ENV, str(manifests))
    return tmp_path


# --------------------------------------------------------------------------------------------
# Manifests shipped in weights/
# --------------------------------------------------------------------------------------------


BUILTIN = sorted(p.stem for p in (REPO_ROOT / "weights").glob("*.json"))


def test_builtin_manifests_include_the_llava_bundles():
    assert {"llava-1.6-mistral-7b", "llava-1.6-vicuna-7b"} <= set(BUILTIN)
    assert DEFAULT_MODEL in BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_manifest_is_complete_and_pinned(name: str):
    path = REPO_ROOT / "weights" / f"{name}.json"
    raw = json.loads(path.read_text())
    # The exact keys of the manifest format, nothing missing, nothing extra.
    assert set(raw) == {
        "name", "description", "repo_id", "revision", "files", "template", "n_ctx", "max_visual_tokens", "license"
    }
    assert set(raw["files"]) == {"llm", "vision", "fusion"}
    manifest = Manifest.from_dict(raw, path)
    assert manifest.name == name
    assert re.fullmatch(r"[0-9a-f]{40}", manifest.revision), "pin a commit, not a branch"
    assert manifest.files["fusion"] is None
    assert "fusion is off" in manifest.description.lower()
    for role in ("llm", "vision"):
        spec = manifest.files[role]
        assert spec.filename.endswith(".gguf")
        assert spec.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    # A prompt family `fila ask` knows (the GGUFs' own chat templates are not relied on).
    assert manifest.template in FAMILIES


def test_manifest_validation_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "files": {"llm": {"filename": "a.gguf", "sha256": "xyz"}}}))
    with pytest.raises(ModelError, match=re.escape(str(bad))):
        bundles.read_manifest(bad)
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="not JSON"):
        bundles.read_manifest(bad)


def test_manifests_install_with_the_package():
    """pyproject lists its packages by hand (find cannot map weights/ to fila_cli.manifests):
    every package under fila_cli must be listed, and the manifests mapped and included."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(d.relative_to(REPO_ROOT).parts)
        for d in [REPO_ROOT / "fila_cli", *(REPO_ROOT / "fila_cli").rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"]["fila_cli.manifests"] == "weights"
    assert "fila_cli.manifests" in listed
    assert "*.json" in config["package-data"]["fila_cli.manifests"]


# --------------------------------------------------------------------------------------------
# Known names: not installed, unknown
# --------------------------------------------------------------------------------------------


def test_default_model_not_installed_says_how_to_pull(isolated: Path):
    with pytest.raises(ModelError) as info:
        resolve_bundle(None)
    assert str(info.value) == (
        "model 'llava-1.6-mistral-7b' is not installed: run `fila weights pull llava-1.6-mistral-7b`"
    )
    assert info.value.exit_code == ExitCode.MODEL


def test_fila_model_env_picks_the_default(isolated: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(MODEL_ENV, "tiny")
    with pytest.raises(ModelError, match=re.escape("model 'tiny' is not installed: run `fila weights pull tiny`")):
        resolve_bundle(None)


def test_unknown_name_lists_known_ones(isolated: Path):
    with pytest.raises(ModelError) as info:
        resolve_bundle("no-such-model")
    message = str(info.value)
    assert "unknown model 'no-such-model'" in message
    for name in ("tiny", "llava-1.6-mistral-7b", "llava-1.6-vicuna-7b"):
        assert name in message


def test_installed_name_resolves_from_the_hf_cache_layout(isolated: Path):
    """Files laid out as huggingface_hub's cache (snapshots/<commit>/<file>) are found offline."""
    snapshot = isolated / "hf-cache" / "models--fila-test--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    llm = write_gguf(snapshot / "llm.gguf", "llama")
    vision = write_gguf(snapshot / "mmproj.gguf", "clip")
    bundle = resolve_bundle("tiny")
    assert (bundle.llm, bundle.vision, bundle.fusion) == (llm, vision, None)
    assert bundle.template is None and not bundle.fusion_enabled
    # Only one of the two files present: still not installed.
    vision.unlink()
    with pytest.raises(ModelError, match="not installed"):
        resolve_bundle("tiny")


def test_manifest_lookup_prefers_extra_dirs(isolated: Path):
    assert get_manifest("tiny").repo_id == "fila-test/tiny"
    assert "tiny" in load_manifests() and DEFAULT_MODEL in load_manifests()


# --------------------------------------------------------------------------------------------
# Directory bundles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "clip_name, llama_name", [("a.gguf", "b.gguf"), ("b.gguf", "a.gguf"), ("llm.gguf", "mmproj.gguf")]
)
def test_directory_bundle_tells_llm_from_mmproj_by_metadata(tmp_path: Path, clip_name: str, llama_name: str):
    vision = write_gguf(tmp_path / clip_name, "clip")
    llm = write_gguf(tmp_path / llama_name, "llama")
    bundle = resolve_bundle(str(tmp_path))
    assert (bundle.llm, bundle.vision) == (llm, vision)
    assert bundle.name == tmp_path.name and bundle.fusion is None


def test_gguf_header_reads_architecture_and_type(tmp_path: Path):
    header = read_gguf_header(write_gguf(tmp_path / "x.gguf", "clip", file_type="model"))
    assert (header.architecture, header.type, header.is_vision) == ("clip", "model", True)


def test_directory_bundle_ignores_lora_adapters(tmp_path: Path):
    write_gguf(tmp_path / "base.gguf", "llama")
    write_gguf(tmp_path / "lora.gguf", "llama", file_type="adapter")
    write_gguf(tmp_path / "proj.gguf", "clip")
    assert resolve_bundle(str(tmp_path)).llm.name == "base.gguf"


def test_directory_with_two_llms_is_ambiguous(tmp_path: Path):
    write_gguf(tmp_path / "q4.gguf", "llama")
    write_gguf(tmp_path / "q5.gguf", "llama")
    write_gguf(tmp_path / "proj.gguf", "clip")
    with pytest.raises(ModelError, match=r"exactly one LLM GGUF, found 2 \(q4.gguf, q5.gguf\); pass --llm"):
        resolve_bundle(str(tmp_path))


def test_directory_without_mmproj(tmp_path: Path):
    write_gguf(tmp_path / "llm.gguf", "llama")
    with pytest.raises(ModelError, match=r"found 0 \(none\); pass --mmproj"):
        resolve_bundle(str(tmp_path))


def test_broken_gguf_is_a_model_error(tmp_path: Path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="broken.gguf: not a GGUF file"):
        resolve_bundle(str(tmp_path))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic, then cut short
    with pytest.raises(ModelError, match="cannot read GGUF file .*broken.gguf: corrupt or truncated"):
        resolve_bundle(str(tmp_path))


def test_missing_directory(tmp_path: Path):
    with pytest.raises(ModelError, match="bundle directory not found"):
        resolve_bundle(str(tmp_path / "nope"))


def test_bundle_json_relative_paths_and_settings(tmp_path: Path):
    (tmp_path / "m").mkdir()
    llm = write_gguf(tmp_path / "m" / "lm.gguf", "llama")
    vision = write_gguf(tmp_path / "proj.gguf", "clip")
    fusion = tmp_path / "fila.safetensors"
    fusion.write_bytes(b"stand-in")
    (tmp_path / "fila.json").write_text("{}")
    (tmp_path / "bundle.json").write_text(
        json.dumps(
            {
                "name": "mine",
                "files": {"llm": {"filename": "m/lm.gguf"}, "vision": "proj.gguf", "fusion": "fila.safetensors"},
                "template": "vicuna",
                "n_ctx": 2048,
                "max_visual_tokens": 1000,
            }
        )
    )
    bundle = resolve_bundle(str(tmp_path))
    assert (bundle.name, bundle.llm, bundle.vision, bundle.fusion) == ("mine", llm, vision, fusion)
    assert (bundle.template, bundle.n_ctx, bundle.max_visual_tokens) == ("vicuna", 2048, 1000)
    assert bundle.fusion_enabled and bundle.fusion_config == tmp_path / "fila.json"
    # The same bundle by its bundle.json path.
    assert resolve_bundle(str(tmp_path / "bundle.json")).llm == llm
    # Fusion weights without their config beside them.
    (tmp_path / "fila.json").unlink()
    with pytest.raises(ModelError, match="no config beside them"):
        resolve_bundle(str(tmp_path))


def test_bundle_json_missing_file_is_named(tmp_path: Path):
    write_gguf(tmp_path / "proj.gguf", "clip")
    (tmp_path / "bundle.json").write_text(json.dumps({"files": {"llm": "gone.gguf", "vision": "proj.gguf"}}))
    with pytest.raises(ModelError, match=r"llm file of .*bundle.json not found: .*gone.gguf"):
        resolve_bundle(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Explicit paths
# --------------------------------------------------------------------------------------------


def test_explicit_paths_need_no_installed_model(isolated: Path):
    llm = write_gguf(isolated / "l.gguf", "llama")
    vision = write_gguf(isolated / "v.gguf", "clip")
    bundle = resolve_bundle(None, llm=llm, mmproj=str(vision))
    assert (bundle.llm, bundle.vision, bundle.fusion, bundle.template) == (llm, vision, None, None)
    assert (bundle.n_ctx, bundle.max_visual_tokens) == (bundles.DEFAULT_N_CTX, bundles.DEFAULT_MAX_VISUAL_TOKENS)


def test_explicit_path_overrides_a_bundle(tmp_path: Path):
    (tmp_path / "b").mkdir()
    write_gguf(tmp_path / "b" / "l.gguf", "llama")
    vision = write_gguf(tmp_path / "b" / "v.gguf", "clip")
    other = write_gguf(tmp_path / "other.gguf", "llama")
    bundle = resolve_bundle(str(tmp_path / "b"), llm=other)
    assert (bundle.llm, bundle.vision) == (other, vision)


def test_explicit_path_errors(tmp_path: Path):
    llm = write_gguf(tmp_path / "l.gguf", "llama")
    vision = write_gguf(tmp_path / "v.gguf", "clip")
    with pytest.raises(ModelError, match=r"--llm file not found: .*missing.gguf"):
        resolve_bundle(None, llm=tmp_path / "missing.gguf", mmproj=vision)
    with pytest.raises(ModelError, match=r"--fusion file not found"):
        resolve_bundle(None, llm=llm, mmproj=vision, fusion=tmp_path / "f.safetensors")
    # Swapped: each header says which is which.
    with pytest.raises(ModelError, match=r"--llm file .*v.gguf is an mmproj"):
        resolve_bundle(None, llm=vision, mmproj=llm)
    with pytest.raises(ModelError, match=r"--mmproj file .*l.gguf is not a vision projector"):
        resolve_bundle(None, llm=llm, mmproj=llm)


def test_hub_manifest_needs_repo_and_revision(isolated: Path):
    (isolated / "manifests" / "norepo.json").write_text(
        json.dumps({"name": "norepo", "files": {"llm": "a.gguf", "vision": "b.gguf"}, "revision": "0" * 40})
    )
    with pytest.raises(ModelError, match=r"norepo.json: 'repo_id' is required"):
        load_manifests()


def test_explicit_vision_may_be_a_safetensors_checkpoint_directory(tmp_path: Path):
    llm = write_gguf(tmp_path / "l.gguf", "llama")
    checkpoint = tmp_path / "llava-next"
    checkpoint.mkdir()
    assert resolve_bundle(None, llm=llm, mmproj=checkpoint).vision == checkpoint
    with pytest.raises(ModelError, match="--llm file not found"):
        resolve_bundle(None, llm=checkpoint, mmproj=checkpoint)


@pytest.mark.parametrize("name", ["../outside.gguf", "m/../../outside.gguf", "/etc/hostname", "C:\\\\x.gguf", ""])
def test_a_manifest_that_names_a_file_outside_its_folder_is_refused(tmp_path: Path, name: str):
    folder = tmp_path / "bundle"
    folder.mkdir()
    write_gguf(tmp_path / "outside.gguf", "llama")  # exists: only the check can refuse it
    write_gguf(folder / "proj.gguf", "clip")
    (folder / "bundle.json").write_text(json.dumps({"files": {"llm": name, "vision": "proj.gguf"}}))
    with pytest.raises(ModelError, match="outside the bundle's folder"):
        resolve_bundle(str(folder))
