"""Model bundles: the set of weight files one `fila ask` needs, and how a name becomes paths.

A bundle is an LLM GGUF, a vision tower (an mmproj GGUF or HF safetensors), optionally trained
FILA fusion weights, and the few settings that go with them (prompt family, context size, visual
token budget). Bundles come from three places:

* a *manifest* (``weights/<name>.json``, installed as ``fila_cli.manifests``) naming a public
  Hugging Face repository, a pinned revision and the files to take from it; the files themselves
  live in the user's Hugging Face cache once ``fila weights pull NAME`` fetched them;
* a directory with a ``bundle.json`` (same keys as a manifest, file names relative to it);
* a directory holding one LLM GGUF and one mmproj GGUF, told apart by their GGUF metadata.

Explicit file paths (``--llm``, ``--mmproj``, ``--fusion``) override whatever the bundle says.
Nothing here touches the network: resolving a known name only looks into the local cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from fila_cli.config import AnyresConfig, fusion_config_path
from fila_cli.errors import ModelError
from fila_cli.gguf_files import GGUFHeader, read_gguf_header  # noqa: F401  (GGUFHeader: re-exported)
from fila_cli.vision.token_count import max_visual_tokens

# Bundle used when neither --model nor $FILA_MODEL names one.
DEFAULT_MODEL = "llava-1.6-mistral-7b"
MODEL_ENV = "FILA_MODEL"
# Extra manifest directories (os.pathsep-separated), searched before the built-in ones.
MANIFESTS_ENV = "FILA_MANIFESTS"
# Package the top-level weights/ folder installs as (see pyproject's package-dir).
MANIFEST_PACKAGE = "fila_cli.manifests"
MANIFEST_SUFFIX = ".json"
BUNDLE_FILE = "bundle.json"

# Roles of the files in a bundle, in the order they are listed.
LLM, VISION, FUSION, LORA = "llm", "vision", "fusion", "lora"
ROLES = (LLM, VISION, FUSION, LORA)
# Roles a bundle may leave out: fusion weights (fusion off) and a LoRA adapter (fila train stage 2).
OPTIONAL_ROLES = (FUSION, LORA)

GGUF_SUFFIX = ".gguf"

# Trained FILA fusion weights: ``<stem>.safetensors`` with its config ``<stem>.json`` beside it.
# A plain directory bundle picks them up under this stem.
FUSION_STEM = "fusion"
SAFETENSORS_SUFFIX = ".safetensors"

# Defaults for bundles that do not say (explicit paths, plain directories).
DEFAULT_N_CTX = 4096
# LLaVA-1.6's vision tower is a ViT-L/14: 14-pixel patches.
DEFAULT_PATCH_SIZE = 14
# Largest LLaVA-NeXT visual sequence for the default canvases (a page shaped like the 672x672 one).
DEFAULT_MAX_VISUAL_TOKENS = max_visual_tokens(AnyresConfig(), DEFAULT_PATCH_SIZE)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Explicit files (--llm/--mmproj/--fusion) are named "custom:<hash of their identities>"; 12 hex
# digits (48 bits) keep names short while two different sets of files never meet the same one.
CUSTOM_NAME = "custom"
CUSTOM_HASH_CHARS = 12


@dataclass(frozen=True)
class FileSpec:
    """One file of a manifest: its name in the repository (or bundle directory) and, when
    known, its SHA-256 and size in bytes (from the Hub's LFS pointer)."""

    filename: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Manifest:
    """What ``weights/<name>.json`` or a directory's ``bundle.json`` says."""

    name: str
    description: str
    files: dict[str, FileSpec | None]  # role -> file; fusion may be None
    template: str | None = None
    n_ctx: int = DEFAULT_N_CTX
    max_visual_tokens: int = DEFAULT_MAX_VISUAL_TOKENS
    license: str | None = None
    repo_id: str | None = None  # None for local bundle.json files
    revision: str | None = None
    source: Path | None = None  # the JSON file it was read from

    @classmethod
    def from_dict(cls, data: Any, source: Path, *, default_name: str | None = None) -> Manifest:
        """Validate parsed JSON; every problem is a ModelError naming ``source``."""

        def bad(what: str) -> ModelError:
            return ModelError(f"invalid bundle manifest {source}: {what}")

        if not isinstance(data, dict):
            raise bad("the top level must be a JSON object")
        name = data.get("name", default_name)
        if not isinstance(name, str) or not name:
            raise bad("'name' must be a non-empty string")
        raw_files = data.get("files")
        if not isinstance(raw_files, dict):
            raise bad("'files' must be an object with 'llm' and 'vision' entries")
        unknown = sorted(set(raw_files) - set(ROLES))
        if unknown:
            raise bad(f"unknown file role(s) {', '.join(unknown)}; expected {', '.join(ROLES)}")
        files: dict[str, FileSpec | None] = {}
        for role in ROLES:
            spec = raw_files.get(role)
            if spec is None:
                if role not in OPTIONAL_ROLES:
                    raise bad(f"'files.{role}' is required")
                files[role] = None
                continue
            files[role] = _file_spec(spec, role, bad)
        for key in ("n_ctx", "max_visual_tokens"):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise bad(f"'{key}' must be a positive integer")
        template = data.get("template")
        if template is not None and not isinstance(template, str):
            raise bad("'template' must be a string or null")
        return cls(
            name=name,
            description=str(data.get("description") or ""),
            files=files,
            template=template,
            n_ctx=data.get("n_ctx") or DEFAULT_N_CTX,
            max_visual_tokens=data.get("max_visual_tokens") or DEFAULT_MAX_VISUAL_TOKENS,
            license=data.get("license"),
            repo_id=data.get("repo_id"),
            revision=data.get("revision"),
            source=source,
        )

    def file_specs(self) -> dict[str, FileSpec]:
        """The files present in the manifest (fusion left out when null)."""
        return {role: spec for role, spec in self.files.items() if spec is not None}


def stays_inside(name: str) -> bool:
    """True for a relative name that stays in its folder (``sub/llm.gguf``; not ``/etc/x``, not ``../x``)."""
    pure = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not pure.is_absolute() and not PureWindowsPath(name).drive and ".." not in pure.parts


def _file_spec(spec: Any, role: str, bad) -> FileSpec:
    # Local bundle.json files may name a file with a plain string.
    if isinstance(spec, str):
        spec = {"filename": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("filename"), str):
        raise bad(f"'files.{role}' must be a file name or an object with a 'filename'")
    if not stays_inside(spec["filename"]):
        # A manifest from elsewhere (a download, a shared folder) must not open any file it likes.
        raise bad(f"'files.{role}' names {spec['filename']!r}, outside the bundle's folder; name the file "
                  f"relative to {BUNDLE_FILE}, without '..'")
    sha256 = spec.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256_RE.match(sha256)):
        raise bad(f"'files.{role}.sha256' must be 64 lower-case hex digits or null")
    size = spec.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise bad(f"'files.{role}.size' must be a byte count or null")
    return FileSpec(filename=spec["filename"], sha256=sha256, size=size)


@dataclass
class Bundle:
    """Resolved, existing files for one model, ready for `fila ask`."""

    name: str
    llm: Path  # GGUF language model
    vision: Path  # mmproj GGUF, or HF safetensors (a file or a checkpoint directory)
    fusion: Path | None = None  # FILA fusion safetensors (config JSON beside it); None = fusion off
    lora: Path | None = None  # GGUF LoRA adapter applied on top of the LLM (fila train stage 2)
    template: str | None = None  # prompt family; None = the GGUF's tokenizer.chat_template
    n_ctx: int = DEFAULT_N_CTX
    max_visual_tokens: int = DEFAULT_MAX_VISUAL_TOKENS
    description: str = ""
    # Where the bundle came from: a manifest (name) or a directory; for messages and `info`.
    source: str = ""
    # Manifest file specs (with checksums) when the bundle came from one.
    specs: dict[str, FileSpec] = field(default_factory=dict, repr=False)

    @property
    def fusion_config(self) -> Path | None:
        return None if self.fusion is None else fusion_config_path(self.fusion)

    @property
    def fusion_enabled(self) -> bool:
        return self.fusion is not None

    def paths(self) -> dict[str, Path]:
        """role -> path for the files this bundle uses."""
        out = {LLM: self.llm, VISION: self.vision}
        if self.fusion is not None:
            out[FUSION] = self.fusion
        if self.lora is not None:
            out[LORA] = self.lora
        return out


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


def builtin_manifest_dirs() -> list[Path]:
    """The installed manifests (``fila_cli.manifests``), or ``weights/`` in a source checkout."""
    import importlib

    try:
        # A namespace package (weights/ has no __init__.py): its __path__ lists its folders.
        package = importlib.import_module(MANIFEST_PACKAGE)
        return [Path(p) for p in package.__path__]
    except ModuleNotFoundError:
        # Running from a source tree that was not installed: weights/ sits beside fila_cli/.
        return [Path(__file__).resolve().parent.parent / "weights"]


def manifest_dirs() -> list[Path]:
    """Directories searched for ``<name>.json`` manifests, first match wins."""
    extra = [Path(p) for p in os.environ.get(MANIFESTS_ENV, "").split(os.pathsep) if p]
    return [*extra, *builtin_manifest_dirs()]


def load_manifests() -> dict[str, Manifest]:
    """All known manifests by name (earlier directories shadow later ones)."""
    manifests: dict[str, Manifest] = {}
    for directory in manifest_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob(f"*{MANIFEST_SUFFIX}")):
            manifest = read_manifest(path)
            for key in ("repo_id", "revision"):
                if not isinstance(getattr(manifest, key), str):
                    raise ModelError(f"invalid bundle manifest {path}: '{key}' is required")
            manifests.setdefault(manifest.name, manifest)
    return manifests


def read_manifest(path: Path, *, default_name: str | None = None) -> Manifest:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelError(f"cannot read bundle manifest {path}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise ModelError(f"invalid bundle manifest {path}: not JSON ({error.msg} at line {error.lineno})") from error
    return Manifest.from_dict(data, path, default_name=default_name)


def get_manifest(name: str) -> Manifest:
    manifests = load_manifests()
    if name not in manifests:
        known = ", ".join(sorted(manifests)) or "none"
        raise ModelError(
            f"unknown model '{name}': known models are {known}; or pass a bundle directory, "
            "or --llm and --mmproj files"
        )
    return manifests[name]


# --------------------------------------------------------------------------------------------
# Local bundles
# --------------------------------------------------------------------------------------------


def load_bundle_dir(directory: Path) -> Bundle:
    """A directory with ``bundle.json``, or one holding one LLM GGUF and one mmproj GGUF."""
    directory = directory.expanduser()
    if not directory.is_dir():
        raise ModelError(f"bundle directory not found: {directory}")
    bundle_json = directory / BUNDLE_FILE
    if bundle_json.is_file():
        return load_bundle_json(bundle_json)
    return _detect_bundle(directory)


def load_bundle_json(path: Path) -> Bundle:
    manifest = read_manifest(path, default_name=path.parent.name)
    base = path.parent
    paths = {
        role: _existing(base / spec.filename, f"{role} file of {path}", allow_dir=role == VISION)
        for role, spec in manifest.file_specs().items()
    }
    return _bundle_from(manifest, paths, source=str(path.parent))


def _detect_bundle(directory: Path) -> Bundle:
    llms: list[Path] = []
    visions: list[Path] = []
    for path in sorted(directory.glob(f"*{GGUF_SUFFIX}")):
        header = read_gguf_header(path)
        if header.is_adapter:
            continue  # LoRA adapters belong to an LLM; they are not one
        (visions if header.is_vision else llms).append(path)
    for kind, found, flag in (("LLM", llms, "--llm"), ("mmproj (general.architecture 'clip')", visions, "--mmproj")):
        if len(found) != 1:
            listed = ", ".join(p.name for p in found) or "none"
            raise ModelError(
                f"directory {directory} must hold exactly one {kind} GGUF, found {len(found)} ({listed}); "
                f"pass {flag} or write a {BUNDLE_FILE}"
            )
    fusion = directory / f"{FUSION_STEM}{SAFETENSORS_SUFFIX}"
    manifest = Manifest(name=directory.name, description=f"local bundle {directory}", files={})
    paths = {LLM: llms[0], VISION: visions[0]}
    if fusion.is_file():
        paths[FUSION] = fusion
    return _bundle_from(manifest, paths, source=str(directory))


def _bundle_from(manifest: Manifest, paths: dict[str, Path], *, source: str) -> Bundle:
    bundle = Bundle(
        name=manifest.name,
        llm=paths[LLM],
        vision=paths[VISION],
        fusion=paths.get(FUSION),
        lora=paths.get(LORA),
        template=manifest.template,
        n_ctx=manifest.n_ctx,
        max_visual_tokens=manifest.max_visual_tokens,
        description=manifest.description,
        source=source,
        specs=manifest.file_specs(),
    )
    _check_fusion_config(bundle)
    return bundle


def _existing(path: Path, what: str, *, allow_dir: bool = False) -> Path:
    path = path.expanduser()
    if not (path.is_file() or (allow_dir and path.is_dir())):
        raise ModelError(f"{what} not found: {path}")
    return path


def _check_fusion_config(bundle: Bundle) -> None:
    if bundle.fusion is not None and not bundle.fusion_config.is_file():
        raise ModelError(
            f"fusion weights {bundle.fusion} have no config beside them: expected {bundle.fusion_config}"
        )


# --------------------------------------------------------------------------------------------
# Installed (cached) bundles
# --------------------------------------------------------------------------------------------


def cached_file(manifest: Manifest, spec: FileSpec) -> Path | None:
    """Path of a manifest file in the Hugging Face cache, or None; never goes online."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=manifest.repo_id, filename=spec.filename, revision=manifest.revision)
    return Path(found) if isinstance(found, str) else None


def not_installed_error(name: str) -> ModelError:
    return ModelError(f"model '{name}' is not installed: run `fila weights pull {name}`")


def bundle_from_manifest(manifest: Manifest) -> Bundle:
    """The installed bundle for a known name; ModelError if any file is missing from the cache."""
    paths: dict[str, Path] = {}
    for role, spec in manifest.file_specs().items():
        # huggingface_hub moves a file into the cache only once it is complete; whether its bytes
        # are the manifest's is `pull`'s and `verify`'s job (hashing GBs on every ask is not).
        path = cached_file(manifest, spec)
        if path is None:
            raise not_installed_error(manifest.name)
        paths[role] = path
    return _bundle_from(manifest, paths, source=f"{manifest.repo_id}@{manifest.revision}")


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def default_model() -> str:
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def looks_like_path(model: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return any(sep in model for sep in seps) or model.startswith((".", "~"))


def load_bundle(model: str) -> Bundle:
    """A bundle from a known name (installed in the cache), a directory or a bundle.json path.

    A bare word is a known name first; only when no manifest has that name is it tried as a
    directory in the current folder.
    """
    if looks_like_path(model) or (model not in load_manifests() and Path(model).exists()):
        path = Path(model).expanduser()
        if path.is_file() and path.name.endswith(MANIFEST_SUFFIX):
            return load_bundle_json(path)
        if path.is_file() and path.name.endswith(GGUF_SUFFIX):
            raise ModelError(
                f"{path} is a single GGUF file, not a bundle: pass it as --llm (or --mmproj) with its partner file"
            )
        return load_bundle_dir(path)
    return bundle_from_manifest(get_manifest(model))


def resolve_bundle(
    model: str | None,
    *,
    llm: str | Path | None = None,
    mmproj: str | Path | None = None,
    fusion: str | Path | None = None,
) -> Bundle:
    """What `fila ask` runs: ``model`` (name, directory or default) with explicit paths on top.

    When both ``llm`` and ``mmproj`` are given and no model is named, no bundle is looked up at
    all (so nothing needs to be installed); the settings are the defaults and the prompt comes
    from the GGUF's chat template.
    """
    explicit = {
        LLM: _explicit(llm, "--llm"),
        VISION: _explicit(mmproj, "--mmproj", allow_dir=True),
        FUSION: _explicit(fusion, "--fusion"),
    }
    only_explicit = model is None and explicit[LLM] is not None and explicit[VISION] is not None
    if only_explicit:
        bundle = Bundle(name=CUSTOM_NAME, llm=explicit[LLM], vision=explicit[VISION], source="explicit paths")
    else:
        bundle = load_bundle(model or default_model())
    overrides = {role: path for role, path in explicit.items() if path is not None}
    if overrides:
        # Checksums in the manifest describe the manifest's files, not the user's.
        specs = {role: spec for role, spec in bundle.specs.items() if role not in overrides}
        bundle = replace(bundle, specs=specs, **overrides)
        bundle = replace(bundle, name=custom_name(bundle, base=None if only_explicit else bundle.name))
    _check_roles(bundle, explicit)
    _check_fusion_config(bundle)
    return bundle


def custom_name(bundle: Bundle, *, base: str | None = None) -> str:
    """``custom:<hash>`` (or ``<base>+custom:<hash>`` over a named bundle) from the files' identities.

    Records name the model they came from and ``fila batch --resume`` keys on that name, so two
    different sets of explicit files must never share one.
    """
    from fila_cli.vision.loaders.identity import file_identity  # fingerprints: a few MiB read per file

    identities = "\n".join(f"{role}:{file_identity(path) if path is not None else '-'}"
                           for role, path in ((LLM, bundle.llm), (VISION, bundle.vision), (FUSION, bundle.fusion)))
    digest = hashlib.sha256(identities.encode()).hexdigest()[:CUSTOM_HASH_CHARS]
    name = f"{CUSTOM_NAME}:{digest}"
    return name if base is None else f"{base}+{name}"


def _explicit(path: str | Path | None, flag: str, *, allow_dir: bool = False) -> Path | None:
    if path is None:
        return None
    return _existing(Path(path), f"{flag} file", allow_dir=allow_dir)


def _check_roles(bundle: Bundle, explicit: dict[str, Path | None]) -> None:
    """Catch swapped --llm/--mmproj early, where the GGUF header says so."""
    if explicit[LLM] is not None and read_gguf_header(bundle.llm).is_vision:
        raise ModelError(f"--llm file {bundle.llm} is an mmproj (general.architecture 'clip'); pass it as --mmproj")
    vision = explicit[VISION]
    if vision is not None and vision.is_file() and vision.name.endswith(GGUF_SUFFIX):
        header = read_gguf_header(vision)
        if not header.is_vision:
            raise ModelError(
                f"--mmproj file {vision} is not a vision projector (general.architecture '{header.architecture}')"
            )
