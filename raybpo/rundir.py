"""The run directory: one folder per stage, each with its outputs and a `manifest.json`.

A stage is skipped when its manifest records the same config hash and input hashes as the
current call; a stage without a manifest (it died half-way, or never ran) is deleted and redone
from scratch. The manifest is written last, so its presence means the outputs are complete.
The run directory is a local path or any URI pyarrow's filesystems understand (s3://, gs://, ...).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raybpo.config import Config

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGE_MARKER = ".raybpo-stage"  # written first into every stage folder raybpo makes: only those are ever deleted
COMPLETE = ".raybpo-complete"  # written last into a folder of the node cache: a folder without it is never used
VERSIONED_PACKAGES = ("raybpo", "ray", "torch", "transformers", "peft", "pyarrow", "pydantic", "numpy")


class RunDir:
    """A run directory on a pyarrow filesystem; paths below it are `/`-joined relative parts."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        self.uri = uri

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """A path below the run directory as a string other tools open (local path, or scheme://...)."""
        scheme = self.uri.split("://", 1)[0] + "://" if "://" in self.uri else ""
        return scheme + self.path(*parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> str:
        path = self.path(*parts)
        self.fs.create_dir(path, recursive=True)
        return path

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(path)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write a file whole or not at all: on a local disk into a temporary file renamed over the target; in
        object storage the object appears only once its upload completes."""
        path = self.path(relpath)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        if not self.is_local():
            with self.fs.open_output_stream(path) as out:
                out.write(data)
            return path
        handle, temporary = tempfile.mkstemp(prefix=f".{posixpath.basename(path)}.", dir=posixpath.dirname(path))
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        return path

    def read_bytes(self, relpath: str) -> bytes:
        with self.fs.open_input_stream(self.path(relpath)) as src:
            return src.read()

    def write_json(self, relpath: str, payload: Any) -> str:
        return self.write_bytes(relpath, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(relpath))

    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def folders(self, *parts: str) -> list[str]:
        """The names of the folders directly below `parts` (none when it does not exist)."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)

    def move(self, source: tuple[str, ...], target: tuple[str, ...]) -> None:
        """Move the folder `source` to `target` (parts below the run dir): a rename on a local disk; in object
        storage each file is copied by the store itself (S3's CopyObject), then the source deleted."""
        origin, destination = self.path(*source), self.path(*target)
        self.fs.create_dir(posixpath.dirname(destination), recursive=True)
        if self.is_local():
            os.rename(origin, destination)
            return
        for info in self.fs.get_file_info(pafs.FileSelector(origin, recursive=True)):
            if info.type == pafs.FileType.File:
                copy = posixpath.join(destination, posixpath.relpath(info.path, origin))
                self.fs.create_dir(posixpath.dirname(copy), recursive=True)
                self.fs.copy_file(info.path, copy)
        self.fs.delete_dir(origin)

    def upload_dir(self, local: str | Path, *parts: str) -> str:
        """Copy a local folder to `parts` below the run dir (a plain copy when the run dir is local)."""
        destination = self.path(*parts)
        self.fs.create_dir(destination, recursive=True)
        pafs.copy_files(
            str(local), destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
        )
        return destination


def node_cache_dir() -> Path:
    """This node's cache of models (converted GGUF files, folders fetched from object storage), shared by its
    processes: `RAYBPO_MODEL_CACHE`, else ~/.cache/raybpo/models."""
    return Path(os.environ.get("RAYBPO_MODEL_CACHE") or Path.home() / ".cache" / "raybpo" / "models")


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name` of the node cache, built by `build(empty folder)` on first use: atomically (renamed into
    place with its COMPLETE marker) and by one process of the node at a time (a file lock)."""
    cache = node_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / name
    if (folder / COMPLETE).exists():
        return folder
    with (cache / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / COMPLETE).exists():
            partial = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
            partial.chmod(0o755)
            try:
                build(partial)
                (partial / COMPLETE).write_text(f"{name}\n")
                shutil.rmtree(folder, ignore_errors=True)  # a folder left without its marker
                partial.rename(folder)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    return folder


def node_local(uri: str) -> str:
    """A path on this node to the folder at `uri`: a local path as it is; a URI (s3://...) fetched into the node
    cache once per node and content. The key is the URI and its files' names, sizes and modification times (one
    listing), so a folder a redone stage rewrote is fetched again (object stores keep times to the second: files
    rewritten within the second at the same sizes would not be). Remote work calls this where it opens a model
    (through `models.loading.resolve_model_path`), so no path of another node's disk crosses a Ray boundary."""
    if "://" not in uri:
        return uri
    fs, root = pafs.FileSystem.from_uri(uri)
    files = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"{uri}: no files there (a model folder was expected)")
    listing = sorted((posixpath.relpath(f.path, root), f.size, f.mtime_ns) for f in files)
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:32]

    def fetch(into: Path) -> None:
        log.info("fetching %s (%d files) into this node's cache", uri, len(files))
        pafs.copy_files(root, str(into), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())

    return str(cached_folder(f"{posixpath.basename(root.rstrip('/'))}-{key}", fetch))


def hash_files(fs: pafs.FileSystem, path: str) -> str:
    """sha256 of a file's bytes, or of a folder's sorted (relative name, bytes) pairs."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    files = (
        [info]
        if info.type == pafs.FileType.File
        else sorted(
            (i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File),
            key=lambda i: i.path,
        )
    )
    digest = hashlib.sha256()
    for item in files:
        if info.type == pafs.FileType.Directory:
            digest.update(posixpath.relpath(item.path, path).encode() + b"\0")
        with fs.open_input_stream(item.path, compression=None) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class StageCounts:
    """What a stage body reports; `extra` lands in the manifest beside the counts."""

    rows_in: int
    rows_out: int
    rows_quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    manifest: dict[str, Any]
    skipped: bool


@dataclass(frozen=True)
class StageContext:
    """What a run hands every stage function besides its config: `run(cfg, ctx) -> StageResult`.

    `callbacks`: Ray Train callbacks for the TorchTrainer runs the stage launches (`raybpo tune` gives the
    train stage of a trial its `TrainToTune`, so the trial's reports reach Tune and ASHA can stop it); stages
    without a Ray Train run ignore them. Settings never go here: they are the config, hashed in the manifest.
    """

    callbacks: tuple[Any, ...] = ()


NO_CONTEXT = StageContext()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def require_stage(run_dir: RunDir, stage: str) -> dict[str, Any]:
    """The manifest of a finished upstream stage, or a clear error naming what to run first."""
    manifest = read_manifest(run_dir, stage)
    if manifest is None:
        raise StageMissingError(
            f"{run_dir.uri_of(stage)} has no finished run (no readable {MANIFEST}): run `raybpo {stage}` first"
        )
    return manifest


def stage_identity(manifest: dict[str, Any]) -> str:
    """What a downstream stage records as the input hash of an upstream stage: its config and run."""
    return f"{manifest['config_hash']}@{manifest['created_at']}"


class ForeignFolderError(RuntimeError):
    """A folder where a stage's would go that raybpo did not make: never deleted."""


def read_manifest(run_dir: RunDir, stage: str) -> dict[str, Any] | None:
    """The stage's manifest; None when there is none, or when it cannot be read (a truncated or garbled file is a
    partial stage, redone, with a warning that names it)."""
    if not run_dir.exists(stage, MANIFEST):
        return None
    try:
        return run_dir.read_json(f"{stage}/{MANIFEST}")
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        log.warning(
            "%s: manifest %s is unreadable (%s); the stage counts as unfinished",
            stage,
            run_dir.path(stage, MANIFEST),
            err,
        )
        return None


class StageMissingError(RuntimeError):
    """A stage needs the output of an upstream stage that has not finished."""


def run_stage(
    run_dir: RunDir,
    stage: str,
    config: Config,
    sections: tuple[str, ...],
    input_hashes: Mapping[str, str],
    body: Callable[[str], StageCounts],
) -> StageResult:
    """Run `body(stage_path)` unless a complete run with the same config and inputs is on disk.

    The manifest holds the effective config of `sections`, its hash, the input hashes, the row
    counts, wall time and package versions. It is written only after `body` returns.
    """
    config_hash = config.section_hash(*sections)
    manifest_path = f"{stage}/{MANIFEST}"
    previous = read_manifest(run_dir, stage)
    if previous is not None:
        if previous.get("config_hash") == config_hash and previous.get("input_hashes") == dict(input_hashes):
            log.info("%s: up to date (manifest %s), skipped", stage, run_dir.path(manifest_path))
            return StageResult(previous, skipped=True)
        log.info("%s: config or inputs changed, redoing the stage", stage)
    elif run_dir.exists(stage):
        if not run_dir.exists(stage, STAGE_MARKER) and not run_dir.exists(manifest_path):
            raise ForeignFolderError(
                f"{run_dir.path(stage)} exists but was not made by raybpo (no {STAGE_MARKER} or {MANIFEST} in it), "
                f"so the {stage} stage will not delete it: move it away or choose another --run-dir"
            )
        log.info("%s: found a partial run without a manifest, redoing it from scratch", stage)
    run_dir.remove(stage)
    stage_path = run_dir.makedirs(stage)
    run_dir.write_bytes(f"{stage}/{STAGE_MARKER}", b"")

    started = time.perf_counter()
    counts = body(stage_path)
    manifest = {
        "stage": stage,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"seed": config.seed, **{s: getattr(config, s).model_dump(mode="json") for s in sections}},
        "config_hash": config_hash,
        "input_hashes": dict(input_hashes),
        "rows_in": counts.rows_in,
        "rows_out": counts.rows_out,
        "rows_quarantined": counts.rows_quarantined,
        "quarantine_reasons": dict(sorted(counts.quarantine_reasons.items())),
        **counts.extra,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "versions": package_versions(),
    }
    run_dir.write_json(manifest_path, manifest)
    return StageResult(manifest, skipped=False)
