"""Downloading, checking and describing model bundles (what `fila weights` does).

Downloads go through ``huggingface_hub.hf_hub_download`` into the user's Hugging Face cache, so
``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` mean what they
mean for every other HF tool, and files already fetched by other tools are reused. A download cut
by the network is resumed with HTTP Range requests by huggingface_hub. Every file whose SHA-256
the manifest knows is hashed after the download; a mismatch is reported, never silently deleted.
Progress goes to stderr as Rich bars.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fila_cli.bundles.bundle import (
    FUSION,
    GGUF_SUFFIX,
    LLM,
    LORA,
    VISION,
    Bundle,
    FileSpec,
    Manifest,
    bundle_from_manifest,
    cached_file,
    get_manifest,
    load_bundle,
    load_manifests,
    looks_like_path,
    read_gguf_header,
)
from fila_cli.errors import ModelError

# Read files for hashing in blocks this large: big enough to be I/O bound, small enough for a
# smooth progress bar.
HASH_BLOCK_BYTES = 8 * 1024 * 1024

FUSION_OFF_MESSAGE = "fusion off: no FILA fusion weights trained yet; answers come from the LLaVA-NeXT path"


def cache_path() -> Path:
    """The Hugging Face hub cache the bundles are downloaded to (``$HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def bundle_folder(name_or_dir: str) -> Path:
    """Where a bundle's files are: a bundle directory itself, or for a known name the folder its
    installed files were downloaded to (ModelError when it is not installed)."""
    target = _target(name_or_dir)
    if target.repo_id is None:  # a directory (or a bundle.json beside its files)
        path = Path(name_or_dir).expanduser()
        return (path.parent if path.is_file() else path).resolve()
    present = [path for path in target.paths.values() if path is not None]
    if not present:
        raise ModelError(f"{target.name} is not installed; run: fila weights pull {target.name}")
    return present[0].parent


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class ByteProgress:
    """Rich progress bars over bytes on stderr, one task per file.

    huggingface_hub draws tqdm bars of its own; instead it is handed :meth:`tqdm_class`, a
    stand-in that moves a Rich task, so downloads and hashing share one display.
    """

    def __init__(self, enabled: bool = True):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )

    def __enter__(self) -> ByteProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def add(self, description: str, total: int | None) -> TaskID:
        return self.progress.add_task(description, total=total)

    def tqdm_class(self, task: TaskID) -> type:
        progress = self.progress

        class _TaskTqdm:
            """The part of tqdm's interface huggingface_hub's HTTP and Xet downloaders use
            (the same surface as its own ``_AggregatedTqdm``)."""

            def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any):
                self.n = initial
                self._total = total
                progress.update(task, total=total, completed=initial)

            @property
            def total(self) -> int | None:
                return self._total

            @total.setter
            def total(self, value: int | None) -> None:
                self._total = value
                progress.update(task, total=value)

            def update(self, n: int | float | None = 1) -> None:
                # n is negative when a resumed request is answered with the whole file again.
                step = int(n or 0)
                self.n += step
                progress.advance(task, step)

            def update_transfer(self, n: int | float | None = 1) -> None:
                pass  # network bytes (Xet, compressed); the bar shows bytes written

            def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

            def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

            def refresh(self) -> None:
                pass

            def close(self) -> None:
                pass

            def __enter__(self) -> _TaskTqdm:
                return self

            def __exit__(self, *exc_info: object) -> None:
                pass

        return _TaskTqdm


def sha256_file(path: Path, progress: ByteProgress | None = None) -> str:
    digest = hashlib.sha256()
    task = progress.add(f"verifying {path.name}", path.stat().st_size) if progress else None
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
            if progress is not None:
                progress.progress.advance(task, len(block))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------------------------


def pull(name: str, *, force: bool = False, progress: bool = True) -> Bundle:
    """Download (or find in the cache) every file of a known bundle and check its SHA-256."""
    manifest = get_manifest(name)
    if force and _offline():
        raise ModelError(f"cannot re-download {name} with --force while HF_HUB_OFFLINE is set")
    with ByteProgress(progress) as bars:
        for spec in manifest.file_specs().values():
            path = _download(manifest, spec, force=force, bars=bars)
            problem = _check_file(path, spec, bars)
            if problem:
                raise ModelError(f"{problem}; run `fila weights pull {name} --force`")
    return bundle_from_manifest(manifest)


def _download(manifest: Manifest, spec: FileSpec, *, force: bool, bars: ByteProgress) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs: dict[str, Any] = {}
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = bars.tqdm_class(bars.add(spec.filename, spec.size))
    where = f"{spec.filename} of {manifest.repo_id}@{manifest.revision}"
    retry = f"then run `fila weights pull {manifest.name}` again"
    try:
        return Path(
            hf_hub_download(
                repo_id=manifest.repo_id,
                filename=spec.filename,
                revision=manifest.revision,
                force_download=force,
                **kwargs,
            )
        )
    except LocalEntryNotFoundError as error:
        if _offline():
            raise ModelError(
                f"{where} is not in the cache ({cache_path()}) and HF_HUB_OFFLINE is set: unset it to download"
            ) from error
        raise ModelError(
            f"cannot reach {constants.ENDPOINT} to download {where}: check the network, {retry}"
        ) from error
    except GatedRepoError as error:
        raise ModelError(
            f"{manifest.repo_id} is gated: accept its terms on the Hub and log in (`hf auth login`)"
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelError(f"repository {manifest.repo_id} not found on {constants.ENDPOINT}") from error
    except RevisionNotFoundError as error:
        raise ModelError(
            f"revision {manifest.revision} of {manifest.repo_id} not found on {constants.ENDPOINT}"
        ) from error
    except EntryNotFoundError as error:  # the local variant was caught above
        raise ModelError(f"file {where} not found on {constants.ENDPOINT}; is the manifest right?") from error
    except HfHubHTTPError as error:
        raise ModelError(f"download of {where} failed: {_first_line(error)}") from error
    except ValueError as error:  # --force without a reachable Hub
        if not force:
            raise
        cause = error.__cause__ or error
        raise ModelError(
            f"cannot download {where} again: {_first_line(cause)}; check the network (or HF_ENDPOINT)"
        ) from error
    except OSError as error:  # disk full, size check failed, connection reset, ...
        raise ModelError(f"download of {where} failed: {_first_line(error)}; {retry}") from error
    except Exception as error:
        if _is_network_error(error):
            raise ModelError(f"download of {where} failed: {_first_line(error)}; check the network, {retry}") from error
        raise


def _is_network_error(error: Exception) -> bool:
    # The HTTP stack differs across huggingface_hub versions (requests, httpx, hf_xet): match by origin.
    root = type(error).__module__.split(".")[0]
    return root in {"httpx", "httpx2", "httpcore", "requests", "urllib3", "hf_xet"} or "Xet" in type(error).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_file(path: Path, spec: FileSpec, progress: ByteProgress | None) -> str | None:
    """None when the file matches what the manifest knows, else what is wrong."""
    size = path.stat().st_size
    if spec.sha256 is not None:
        actual = sha256_file(path, progress)
        if actual != spec.sha256:
            return f"checksum mismatch for {path}: expected {spec.sha256}, got {actual}"
    elif spec.size is not None and size != spec.size:
        return f"size mismatch for {path}: expected {spec.size} bytes, got {size}"
    return None


# --------------------------------------------------------------------------------------------
# What a name or directory refers to
# --------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """A bundle as far as it exists: manifest facts plus the local path of each file (or None)."""

    name: str
    description: str
    source: str
    specs: dict[str, FileSpec]
    paths: dict[str, Path | None]
    template: str | None
    n_ctx: int
    max_visual_tokens: int
    license: str | None = None
    repo_id: str | None = None
    revision: str | None = None


def _target(name_or_dir: str) -> _Target:
    manifests = load_manifests()
    if not looks_like_path(name_or_dir) and name_or_dir in manifests:
        m = manifests[name_or_dir]
        specs = m.file_specs()
        return _Target(
            name=m.name,
            description=m.description,
            source=f"{m.repo_id}@{m.revision}",
            specs=specs,
            paths={role: cached_file(m, spec) for role, spec in specs.items()},
            template=m.template,
            n_ctx=m.n_ctx,
            max_visual_tokens=m.max_visual_tokens,
            license=m.license,
            repo_id=m.repo_id,
            revision=m.revision,
        )
    bundle = load_bundle(name_or_dir)  # a directory (or an unknown name: ModelError listing known ones)
    specs = {role: bundle.specs.get(role) or FileSpec(filename=path.name) for role, path in bundle.paths().items()}
    return _Target(
        name=bundle.name,
        description=bundle.description,
        source=bundle.source,
        specs=specs,
        paths=dict(bundle.paths()),
        template=bundle.template,
        n_ctx=bundle.n_ctx,
        max_visual_tokens=bundle.max_visual_tokens,
    )


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


@dataclass
class FileCheck:
    role: str
    filename: str
    path: str | None
    status: str  # "ok", "unchecked" (no checksum known), "missing", "mismatch", "invalid"
    message: str
    sha256: str | None = None  # computed

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "unchecked")


@dataclass
class VerifyReport:
    name: str
    files: list[FileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.files)

    def raise_for_failure(self) -> None:
        bad = [check for check in self.files if not check.ok]
        if bad:
            raise ModelError(f"{self.name}: " + "; ".join(check.message for check in bad))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "files": [asdict(check) for check in self.files]}


def verify(name_or_dir: str, *, progress: bool = True) -> VerifyReport:
    """Hash every file of a bundle against its manifest and check each GGUF is what its role needs."""
    target = _target(name_or_dir)
    report = VerifyReport(name=target.name)
    with ByteProgress(progress) as bars:
        for role, spec in target.specs.items():
            report.files.append(_verify_file(target, role, spec, bars))
    return report


def _verify_file(target: _Target, role: str, spec: FileSpec, bars: ByteProgress) -> FileCheck:
    path = target.paths.get(role)
    if path is not None and path.is_dir():  # a safetensors checkpoint directory: loaded, not hashed
        return FileCheck(role, spec.filename, str(path), "unchecked", f"{path}: checkpoint directory; not hashed")
    if path is None or not path.is_file():
        hint = f"run `fila weights pull {target.name}`" if target.repo_id else "file not found"
        return FileCheck(role, spec.filename, None, "missing", f"{role} file {spec.filename} missing: {hint}")
    problem = _check_file(path, spec, bars)
    if problem:
        return FileCheck(role, spec.filename, str(path), "mismatch", problem)
    role_problem = _role_problem(role, path)
    if role_problem:
        return FileCheck(role, spec.filename, str(path), "invalid", role_problem)
    if spec.sha256 is None:
        return FileCheck(role, spec.filename, str(path), "unchecked", f"{path}: readable; no checksum known")
    return FileCheck(role, spec.filename, str(path), "ok", f"{path}: sha256 {spec.sha256}", spec.sha256)


def _role_problem(role: str, path: Path) -> str | None:
    if not path.name.endswith(GGUF_SUFFIX) or role == FUSION:
        return None
    try:
        header = read_gguf_header(path)
    except ModelError as error:
        return str(error)
    if role == LLM and header.is_vision:
        return f"{path} is an mmproj (general.architecture 'clip'), not an LLM"
    if role == LORA and not header.is_adapter:
        return f"{path} is not a LoRA adapter (general.type is not 'adapter')"
    if role == VISION and not header.is_vision:
        return f"{path} is not a vision projector (general.architecture '{header.architecture}')"
    return None


# --------------------------------------------------------------------------------------------
# info and list
# --------------------------------------------------------------------------------------------


@dataclass
class FileInfo:
    role: str
    filename: str
    path: str | None
    present: bool
    size: int | None  # on disk when a present file, else what the manifest says
    sha256: str | None  # expected, from the manifest


@dataclass
class BundleInfo:
    name: str
    description: str
    source: str
    installed: bool
    template: str | None
    n_ctx: int
    max_visual_tokens: int
    fusion_enabled: bool
    fusion: str
    files: list[FileInfo]
    license: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def info(name_or_dir: str) -> BundleInfo:
    """What a bundle is made of and whether its files are here; never goes online."""
    target = _target(name_or_dir)
    files = []
    for role, spec in target.specs.items():
        path = target.paths.get(role)
        present = path is not None and path.exists()
        is_file = present and path.is_file()
        files.append(
            FileInfo(
                role=role,
                filename=spec.filename,
                path=str(path) if present else None,
                present=present,
                size=path.stat().st_size if is_file else spec.size,
                sha256=spec.sha256,
            )
        )
    fusion_path = target.paths.get(FUSION)
    fusion_enabled = FUSION in target.specs
    return BundleInfo(
        name=target.name,
        description=target.description,
        source=target.source,
        installed=all(f.present for f in files),
        template=target.template,
        n_ctx=target.n_ctx,
        max_visual_tokens=target.max_visual_tokens,
        fusion_enabled=fusion_enabled,
        fusion=f"fusion on: FILA fusion weights {fusion_path}" if fusion_enabled else FUSION_OFF_MESSAGE,
        files=files,
        license=target.license,
        repo_id=target.repo_id,
        revision=target.revision,
    )


@dataclass
class BundleStatus:
    name: str
    description: str
    repo_id: str | None
    installed: bool
    size: int | None  # total download size when every file's size is known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_bundles() -> list[BundleStatus]:
    """Every known bundle and whether all its files are in the cache."""
    return [_status(m) for m in load_manifests().values()]


def _status(manifest: Manifest) -> BundleStatus:
    specs = manifest.file_specs().values()
    sizes = [spec.size for spec in specs]
    return BundleStatus(
        name=manifest.name,
        description=manifest.description,
        repo_id=manifest.repo_id,
        installed=all(cached_file(manifest, spec) is not None for spec in specs),
        size=sum(sizes) if all(s is not None for s in sizes) else None,  # type: ignore[misc]
    )

