"""The commit protocol: stage beside the target, hash, sync, manifest last, rename.

    create  -> mkdir .ckptmgr-staging.<name>.<id> in the run directory
    write   -> payload files, hashed while written (HashingWriter) and fsynced;
               files written by others (Lightning, DeepSpeed, other ranks) are
               hashed from page cache in parallel threads and fsynced
    finalize-> manifest written last and fsynced, staging directories fsynced,
               rename onto a name that does not exist, parent fsynced

Nothing here decides names, sequences or retention: the manager does. A
staging directory that is never finalized is invisible to readers and is
removed by the next lock holder's cleanup.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import __version__, payload
from .errors import CkptMgrError, CommitError, from_os_error
from .hashing import HashingWriter, default_workers, hash_files, map_in_threads
from .manifest import MANIFEST_NAME, FileEntry, Manifest
from .storage import Storage
from .verify import list_tree


@dataclass(kw_only=True)
class ManifestFields:
    """What the caller knows about the checkpoint being staged."""

    step: int
    epoch: int | None = None
    kind: str = "files"
    load_path: str = "."
    epoch_end: bool = False
    world_size: int = 1
    layout: dict[str, Any] = field(default_factory=dict)
    config_fingerprint: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class StagedCheckpoint:
    """A checkpoint being written into its staging directory."""

    def __init__(self, storage: Storage, run_dir: str, staging: str, fields: ManifestFields, *,
                 workers: int | None = None):
        self.storage = storage
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, staging)
        self.fields = fields
        self.started = time.time()
        self._hashed: dict[str, FileEntry] = {}
        self.write_seconds = 0.0
        self.workers = workers  # threads for writing and hashing (default: cores, at most 8)

    def create(self) -> None:
        try:
            self.storage.mkdir(self.path)
        except OSError as exc:
            raise from_os_error(self.path, "creating the staging directory", exc) from exc

    @contextmanager
    def open_file(self, relpath: str) -> Iterator[BinaryIO]:
        """Write one payload file, hashed as it is written and fsynced on close."""
        started = time.perf_counter()
        with self._new_file(relpath) as raw:
            writer = HashingWriter(raw)
            yield writer  # type: ignore[misc]
        self._record(relpath, writer.size, writer.hexdigest(), started)

    def save_torch(self, relpath: str, obj: Any) -> None:
        """``torch.save`` into a payload file, hashed by a thread pool beside the write (see payload.py)."""
        started = time.perf_counter()
        with self._new_file(relpath) as raw:
            size, digest = payload.save(self.storage, raw, obj, workers=self.workers)
        self._record(relpath, size, digest, started)

    @contextmanager
    def _new_file(self, relpath: str) -> Iterator[BinaryIO]:
        full = os.path.join(self.path, relpath)
        parent = os.path.dirname(full)
        try:
            if parent != self.path:
                self.storage.makedirs(parent)
            with self.storage.open_write(full) as raw:
                yield raw
                self.storage.fsync(raw)
        except OSError as exc:
            raise from_os_error(full, "writing a payload file", exc) from exc

    def _record(self, relpath: str, size: int, digest: str, started: float) -> None:
        self._hashed[relpath] = FileEntry(path=relpath, size=size, xxh3_128=digest)
        self.write_seconds += time.perf_counter() - started

    def add_hashed(self, entries) -> None:
        for entry in entries:
            self._hashed[entry.path] = entry

    def finalize(self, *, name: str, sequence: int) -> tuple[str, Manifest]:
        """Write the manifest and publish the checkpoint under ``name``."""
        t0 = time.perf_counter()
        entries = self._hash_remaining()
        hash_seconds = time.perf_counter() - t0
        manifest = self._build_manifest(name, sequence, entries, hash_seconds)
        target = os.path.join(self.run_dir, name)
        manifest_path = os.path.join(self.path, MANIFEST_NAME)
        try:
            with self.storage.open_write(manifest_path) as f:
                f.write(manifest.to_json_bytes())
                self.storage.fsync(f)
            self._sync_dirs()
            self.storage.rename_noreplace(self.path, target)
            self.storage.sync_dir(self.run_dir)
        except OSError as exc:
            raise from_os_error(target, "publishing the checkpoint", exc) from exc
        return target, manifest

    def _hash_remaining(self) -> list[FileEntry]:
        """Hash and fsync the files written by others; return every file's entry."""
        try:
            present, odd = list_tree(self.path)
        except OSError as exc:
            raise from_os_error(self.path, "listing the staging directory", exc) from exc
        if odd:
            raise CommitError(self.path, f"staging directory holds symlinks or special files: {sorted(odd)}")
        present.pop(MANIFEST_NAME, None)
        missing = sorted(set(self._hashed) - set(present))
        if missing:
            raise CommitError(self.path, f"files written through ckptmgr vanished: {missing}")
        foreign = [p for p in present if p not in self._hashed]
        hashed = sync_and_hash(self.storage, self.path, foreign, workers=self.workers)
        return sorted([*self._hashed.values(), *hashed], key=lambda e: e.path)

    def _sync_dirs(self) -> None:
        # New entries in subdirectories (DeepSpeed's checkpoint/) need their
        # own directory fsync; the staging directory itself last.
        subdirs = [d for d, _, _ in os.walk(self.path) if d != self.path]
        for directory in sorted(subdirs, key=len, reverse=True):
            self.storage.sync_dir(directory)
        self.storage.sync_dir(self.path)

    def _build_manifest(self, name: str, sequence: int, entries: list[FileEntry], hash_seconds: float) -> Manifest:
        f = self.fields
        now = time.time()
        return Manifest(
            name=name,
            step=f.step,
            epoch=f.epoch,
            sequence=sequence,
            kind=f.kind,
            load_path=f.load_path,
            files=tuple(entries),
            created_unix=now,
            epoch_end=f.epoch_end,
            world_size=f.world_size,
            layout=f.layout,
            config_fingerprint=f.config_fingerprint,
            metadata=f.metadata,
            timing={
                "started_unix": self.started,
                "write_seconds": round(self.write_seconds, 6),
                "hash_seconds": round(hash_seconds, 6),
                "stage_seconds": round(now - self.started, 6),
            },
            writer={"host": socket.gethostname(), "pid": os.getpid()},
            versions=_versions(),
        )


def sync_and_hash(storage: Storage, root: str, relpaths: list[str], *, workers: int | None = None) -> list[FileEntry]:
    """fsync and hash files someone else wrote into a staging directory (from page cache, in parallel)."""
    full = [os.path.join(root, relpath) for relpath in relpaths]

    def sync(path: str) -> int:
        try:
            storage.sync_file(path)
            return os.stat(path, follow_symlinks=False).st_size
        except OSError as exc:
            raise from_os_error(path, "syncing a staged file", exc) from exc

    sizes = map_in_threads(sync, full, workers or default_workers())
    digests = hash_files(list(zip(full, sizes, strict=True)), workers=workers)
    entries = []
    for relpath, path, size, digest in zip(relpaths, full, sizes, digests, strict=True):
        if isinstance(digest, OSError):
            raise from_os_error(path, "hashing a staged file", digest) from digest
        entries.append(FileEntry(path=relpath, size=size, xxh3_128=digest))
    return entries


def _versions() -> dict[str, str]:
    versions = {"ckptmgr": __version__, "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = str(torch.__version__)
    return versions


def abandon(storage: Storage, path: str) -> None:
    """Remove a staging directory after a failed save; best effort, never masks the cause."""
    try:
        storage.remove_tree(path)
    except OSError:
        pass  # the next lock holder's cleanup removes it


__all__ = ["CkptMgrError", "ManifestFields", "StagedCheckpoint", "abandon"]
