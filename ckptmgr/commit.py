"""The commit protocol (format 3): stage in the run's hidden area, hash, sync, record, rename.

    create   -> .ckptmgr/staging/<stem>.<token>: one file, or a directory of files
    write    -> payload written through ckptmgr is hashed while written and fsynced;
                files written by others (Lightning, DeepSpeed, other ranks) are
                hashed from page cache in parallel threads and fsynced
    finalize -> the commit record (the manifest) is published first, under
                .ckptmgr/manifests/<stem>.<token>.json: it describes bytes that
                are not at the name yet, so nothing verifies against it;
                then the payload is renamed onto RUN/NAME: the commit point;
                then older records of NAME are removed
    finalize_in_place -> the payload is already at RUN/NAME (sealing a legacy
                checkpoint): only the record is published (commit-marker mode)

Saving over an existing name keeps one of the two checkpoints resolvable at
every instant: a file is swapped by ``rename(2)`` (the old bytes match the
old record until the new bytes, matching the new record, replace them); a
directory, which ``rename(2)`` cannot swap, is first moved to
``.ckptmgr/aside/`` and moved back by :func:`recover` if the new one never
arrived.

Nothing here decides names, sequences or retention: the manager does. What a
crash leaves behind is removed (or rolled back) by the next writer's
:func:`recover`.
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
from .errors import CommitError, from_os_error
from .hashing import HashingWriter, default_workers, hash_files, map_in_threads
from .manifest import MANIFEST_NAME, FileEntry, Manifest
from .naming import (
    ASIDE_DIR,
    MANIFESTS_DIR,
    RECORD_SUFFIX,
    STAGING_DIR,
    TRASH_DIR,
    internal_name,
    is_legacy_leftover,
    split_internal,
    stem,
)
from .records import read_records
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
    alias_of: str | None = None


class StagedCheckpoint:
    """A checkpoint being written into ``RUN/.ckptmgr/staging/<stem>.<token>`` (a file, or a directory)."""

    def __init__(self, storage: Storage, run_dir: str, name: str, token: str, fields: ManifestFields, *,
                 shape: str = "directory", workers: int | None = None, path: str | None = None):
        self.storage = storage
        self.run_dir = run_dir
        self.name = name
        self.token = token
        self.shape = shape
        self.base = internal_name(name, token)  # staging entry, record, and aside share it
        self.path = path or os.path.join(run_dir, STAGING_DIR, self.base)
        self.fields = fields
        self.started = time.time()
        self._hashed: dict[str, FileEntry] = {}
        self.write_seconds = 0.0
        self.workers = workers  # threads for writing and hashing (default: cores, at most 8)

    @property
    def is_file(self) -> bool:
        return self.shape == "file"

    def create(self) -> None:
        try:
            self.storage.makedirs(os.path.dirname(self.path))
            if not self.is_file:
                self.storage.mkdir(self.path)
        except OSError as exc:
            raise from_os_error(self.path, "creating the staging area", exc, saving=True) from exc

    # -- writing ---------------------------------------------------------------
    @contextmanager
    def open_file(self, relpath: str | None = None) -> Iterator[BinaryIO]:
        """Write one payload file, hashed as it is written and fsynced on close."""
        started = time.perf_counter()
        with self._new_file(relpath) as raw:
            writer = HashingWriter(raw)
            yield writer  # type: ignore[misc]
        self._record(relpath, writer.size, writer.hexdigest(), started)

    def save_torch(self, relpath: str | None, obj: Any) -> None:
        """``torch.save`` into a payload file, hashed by a thread pool beside the write (see payload.py)."""
        started = time.perf_counter()
        with self._new_file(relpath) as raw:
            size, digest = payload.save(self.storage, raw, obj, workers=self.workers)
        self._record(relpath, size, digest, started)

    def link_from(self, source: str, entries: tuple[FileEntry, ...], *, hard_links: bool) -> None:
        """Fill the staging entry with the bytes of the published checkpoint at ``source`` (the `last` copy).

        Hard links share the source's bytes, so its digests hold; a copy is hashed again.
        """
        started = time.perf_counter()
        try:
            if self.is_file:
                self._clone_file(source, self.path, hard_links)
            else:
                for entry in entries:
                    dst = os.path.join(self.path, entry.path)
                    if os.path.dirname(dst) != self.path:
                        self.storage.makedirs(os.path.dirname(dst))
                    self._clone_file(os.path.join(source, entry.path), dst, hard_links)
        except OSError as exc:
            raise from_os_error(self.path, "linking the checkpoint's files", exc, saving=True) from exc
        if hard_links:
            for entry in entries:
                self._hashed[self.name if self.is_file else entry.path] = entry
        elif self.is_file:  # a copy: its own bytes are hashed (a directory's copies are hashed at finalize)
            (copied,) = sync_and_hash(self.storage, os.path.dirname(self.path), [os.path.basename(self.path)])
            self._hashed[self.name] = FileEntry(path=self.name, size=copied.size, xxh3_128=copied.xxh3_128)
        self.write_seconds += time.perf_counter() - started

    def _clone_file(self, src: str, dst: str, hard_links: bool) -> None:
        if hard_links:
            self.storage.link(src, dst)
        else:
            self.storage.copy_file(src, dst)

    @contextmanager
    def _new_file(self, relpath: str | None) -> Iterator[BinaryIO]:
        if self.is_file != (relpath is None):
            raise CommitError(self.path, "a single-file checkpoint has one payload, written without a relative path"
                              if self.is_file else "a file in a directory checkpoint needs a relative path")
        full = self.path if relpath is None else os.path.join(self.path, relpath)
        parent = os.path.dirname(full)
        try:
            if not self.is_file and parent != self.path:
                self.storage.makedirs(parent)
            with self.storage.open_write(full) as raw:
                yield raw
                self.storage.fsync(raw)
        except OSError as exc:
            raise from_os_error(full, "writing a payload file", exc, saving=True) from exc

    def _record(self, relpath: str | None, size: int, digest: str, started: float) -> None:
        key = relpath or self.name
        self._hashed[key] = FileEntry(path=key, size=size, xxh3_128=digest)
        self.write_seconds += time.perf_counter() - started

    def add_hashed(self, entries) -> None:
        for entry in entries:
            self._hashed[entry.path] = entry

    # -- publishing ----------------------------------------------------------
    def finalize(self, *, name: str, sequence: int, replace: bool = False) -> tuple[str, Manifest]:
        """Publish the record, then the payload under ``name``; returns the checkpoint's path and manifest.

        ``replace``: ``name`` may be taken; the new checkpoint takes its place (see the module docstring).
        """
        t0 = time.perf_counter()
        entries = self._entries(name)
        manifest = self._build_manifest(name, sequence, entries, time.perf_counter() - t0)
        target = os.path.join(self.run_dir, name)
        record = publish_record(self.storage, self.run_dir, self.base, manifest)
        # rename(2) swaps a file for a file only: a directory (or a file over one) is first set aside.
        aside = os.path.join(self.run_dir, ASIDE_DIR, self.base) if replace and (
            not self.is_file or _is_directory(target)) else None
        try:
            self._sync_tree()
            if aside is not None:
                self._set_aside(target, aside)
            if replace and aside is None:
                self.storage.replace(self.path, target)
            else:
                self.storage.rename_noreplace(self.path, target)
        except BaseException:
            if aside is not None and os.path.lexists(aside) and not os.path.lexists(target):
                _rename_quietly(self.storage, aside, target)  # or recover() does it
            _unlink_quietly(self.storage, record)  # never published: nothing at the name matches it
            raise
        try:
            self.storage.sync_dir(self.run_dir)
            self.storage.sync_dir(os.path.dirname(self.path))
            remove_records(self.storage, self.run_dir, name, keep=self.token)
            if aside is not None and os.path.lexists(aside):
                self.storage.remove_tree(aside)
        except OSError as exc:
            raise from_os_error(target, "publishing the checkpoint", exc, saving=True) from exc
        return target, manifest

    def finalize_in_place(self, *, sequence: int) -> tuple[str, Manifest]:
        """Commit-marker mode: the payload already lies at ``RUN/NAME``; hash it and publish its record."""
        t0 = time.perf_counter()
        target = os.path.join(self.run_dir, self.name)
        if self.is_file:
            entries = sync_and_hash(self.storage, self.run_dir, [self.name], workers=self.workers)
        else:
            entries = self._hash_tree(target)
        manifest = self._build_manifest(self.name, sequence, entries, time.perf_counter() - t0)
        publish_record(self.storage, self.run_dir, self.base, manifest)
        remove_records(self.storage, self.run_dir, self.name, keep=self.token)
        return target, manifest

    def finalize_standalone(self) -> tuple[str, Manifest]:
        """An artifact that leaves the run (an export): the manifest goes inside, written last, then the
        directory is renamed onto its name (which must be free)."""
        t0 = time.perf_counter()
        entries = self._hash_tree(self.path)
        manifest = self._build_manifest(self.name, 0, entries, time.perf_counter() - t0)
        target = os.path.join(self.run_dir, self.name)
        try:
            with self.storage.open_write(os.path.join(self.path, MANIFEST_NAME)) as f:
                f.write(manifest.to_json_bytes())
                self.storage.fsync(f)
            self._sync_tree()
            self.storage.rename_noreplace(self.path, target)
            self.storage.sync_dir(self.run_dir)
        except OSError as exc:
            raise from_os_error(target, "publishing", exc, saving=True) from exc
        return target, manifest

    def _set_aside(self, target: str, aside: str) -> None:
        """Move a directory that is about to be replaced to .ckptmgr/aside/ (moved back if we never arrive)."""
        if not os.path.lexists(target):
            return
        self.storage.makedirs(os.path.dirname(aside))
        self.storage.rename_noreplace(target, aside)
        self.storage.sync_dir(self.run_dir)
        self.storage.sync_dir(os.path.dirname(aside))

    def _entries(self, name: str) -> list[FileEntry]:
        if self.is_file:
            entry = self._hashed.get(self.name) or next(iter(self._hashed.values()), None)
            if entry is None:
                raise CommitError(self.path, "nothing was written into the checkpoint")
            return [FileEntry(path=name, size=entry.size, xxh3_128=entry.xxh3_128)]
        return self._hash_tree(self.path)

    def _hash_tree(self, root: str) -> list[FileEntry]:
        """Hash and fsync the files written by others; return every file's entry."""
        try:
            present, odd = list_tree(root)
        except OSError as exc:
            raise from_os_error(root, "listing the staged checkpoint", exc, saving=True) from exc
        if odd:
            raise CommitError(root, f"the checkpoint holds symlinks or special files: {sorted(odd)}")
        missing = sorted(set(self._hashed) - set(present))
        if missing:
            raise CommitError(root, f"files written through ckptmgr vanished: {missing}")
        foreign = [p for p in present if p not in self._hashed]
        hashed = sync_and_hash(self.storage, root, foreign, workers=self.workers)
        return sorted([*self._hashed.values(), *hashed], key=lambda e: e.path)

    def _sync_tree(self) -> None:
        """New entries in every staged directory need their own fsync (deepest first); a file was fsynced."""
        if self.is_file:
            return
        subdirs = [d for d, _, _ in os.walk(self.path)]
        for directory in sorted(subdirs, key=len, reverse=True):
            self.storage.sync_dir(directory)

    def _build_manifest(self, name: str, sequence: int, entries: list[FileEntry], hash_seconds: float) -> Manifest:
        f = self.fields
        now = time.time()
        return Manifest(
            name=name, step=f.step, epoch=f.epoch, sequence=sequence, kind=f.kind,
            load_path=name if self.is_file else f.load_path, files=tuple(entries), created_unix=now,
            shape=self.shape, epoch_end=f.epoch_end, world_size=f.world_size, layout=f.layout,
            config_fingerprint=f.config_fingerprint, metadata=f.metadata,
            timing={
                "started_unix": self.started,
                "write_seconds": round(self.write_seconds, 6),
                "hash_seconds": round(hash_seconds, 6),
                "stage_seconds": round(now - self.started, 6),
            },
            writer={"host": socket.gethostname(), "pid": os.getpid()},
            versions=_versions(), alias_of=f.alias_of,
        )


def publish_record(storage: Storage, run_dir: str, base: str, manifest: Manifest) -> str:
    """Write commit record ``<base>.json`` whole or not at all: temporary name, fsync, rename, directory fsync."""
    directory = os.path.join(run_dir, MANIFESTS_DIR)
    final = os.path.join(directory, f"{base}{RECORD_SUFFIX}")
    tmp = f"{final}.tmp"
    try:
        storage.makedirs(directory)
        with storage.open_write(tmp) as f:
            f.write(manifest.to_json_bytes())
            storage.fsync(f)
        storage.rename_noreplace(tmp, final)
        storage.sync_dir(directory)
    except BaseException as exc:
        _unlink_quietly(storage, tmp)
        if isinstance(exc, OSError):
            raise from_os_error(final, "writing the commit record", exc, saving=True) from exc
        raise
    return final


def remove_records(storage: Storage, run_dir: str, name: str, *, keep: str | None = None) -> list[str]:
    """Remove the commit records of checkpoint ``name`` (all but the one of token ``keep``).

    A record belongs to the name its manifest names; one that does not parse, to the name of its stem.
    """
    own = stem(name)
    doomed = [r.path for r in read_records(run_dir) if r.token != keep
              and (r.manifest.name == name if r.manifest is not None else r.stem == own)]
    for path in doomed:
        storage.unlink(path)
    if doomed:
        storage.sync_dir(os.path.join(run_dir, MANIFESTS_DIR))
    return doomed


def sync_and_hash(storage: Storage, root: str, relpaths: list[str], *, workers: int | None = None) -> list[FileEntry]:
    """fsync and hash files someone else wrote (from page cache, in parallel)."""
    full = [os.path.join(root, relpath) for relpath in relpaths]

    def sync(path: str) -> int:
        try:
            storage.sync_file(path)
            return os.stat(path, follow_symlinks=False).st_size
        except OSError as exc:
            raise from_os_error(path, "syncing a staged file", exc, saving=True) from exc

    sizes = map_in_threads(sync, full, workers or default_workers())
    digests = hash_files(list(zip(full, sizes, strict=True)), workers=workers)
    entries = []
    for relpath, path, size, digest in zip(relpaths, full, sizes, digests, strict=True):
        if isinstance(digest, OSError):
            raise from_os_error(path, "hashing a staged file", digest, saving=True) from digest
        entries.append(FileEntry(path=relpath, size=size, xxh3_128=digest))
    return entries


def _versions() -> dict[str, str]:
    versions = {"ckptmgr": __version__, "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = str(torch.__version__)
    return versions


def abandon(storage: Storage, path: str) -> None:
    """Remove a staging entry after a failed save, and its record if one was written; best effort.

    A staging entry that still exists was never published, so its record (same base name) describes
    bytes that never took their name: the record goes first, then the entry. Never masks the cause.
    """
    if not os.path.lexists(path):
        return  # published (renamed away) or never created: nothing of ours to take back
    run_dir = os.path.dirname(os.path.dirname(os.path.dirname(path)))
    record = os.path.join(run_dir, MANIFESTS_DIR, f"{os.path.basename(path)}{RECORD_SUFFIX}")
    try:
        if os.path.dirname(path) == os.path.join(run_dir, STAGING_DIR):
            _unlink_quietly(storage, record)
        storage.remove_tree(path)
    except OSError:
        pass  # the next writer's recover() removes it


def _is_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _rename_quietly(storage: Storage, src: str, dst: str) -> None:
    try:
        storage.rename_noreplace(src, dst)
        storage.sync_dir(os.path.dirname(dst))
    except OSError:
        pass  # the next writer's recover() moves it back


def _unlink_quietly(storage: Storage, path: str) -> None:
    """Unlink and make the removal durable (a record that came back after a power loss would be an orphan)."""
    try:
        if os.path.lexists(path):
            storage.unlink(path)
            storage.sync_dir(os.path.dirname(path))
    except OSError:
        pass  # the next writer's recover() removes it


# -- recovery: what the next writer does with a crash's leftovers ----------------------------
def recover(storage: Storage, run_dir: str) -> list[str]:
    """Roll back or finish what crashed saves, replacements and deletions left; returns what was done.

    Only the lock holder calls it. Order matters: a directory set aside is
    moved back before the staging entry (and its unpublished record) goes.
    """
    done: list[str] = []
    names = _names_by_stem(run_dir)
    for entry_name in _listdir(os.path.join(run_dir, ASIDE_DIR)):
        done += _recover_aside(storage, run_dir, entry_name, names)
    for entry_name in _listdir(os.path.join(run_dir, STAGING_DIR)):
        parts = split_internal(entry_name)
        _remove(storage, os.path.join(run_dir, STAGING_DIR, entry_name), done)
        if parts is not None:
            _remove(storage, os.path.join(run_dir, MANIFESTS_DIR, f"{entry_name}{RECORD_SUFFIX}"), done)
    for entry_name in _listdir(os.path.join(run_dir, TRASH_DIR)):
        _remove(storage, os.path.join(run_dir, TRASH_DIR, entry_name), done)
        parts = split_internal(entry_name)
        name = names.get(parts[0]) if parts else None
        if name is not None and not os.path.lexists(os.path.join(run_dir, name)):
            done += remove_records(storage, run_dir, name)  # the deletion had not removed them yet
    for entry_name in _listdir(os.path.join(run_dir, MANIFESTS_DIR)):
        if entry_name.endswith(".tmp"):
            _remove(storage, os.path.join(run_dir, MANIFESTS_DIR, entry_name), done)
    for entry_name in _listdir(run_dir):
        if is_legacy_leftover(entry_name):
            _remove(storage, os.path.join(run_dir, entry_name), done)
    return done


def _recover_aside(storage: Storage, run_dir: str, entry_name: str, names: dict[str, str]) -> list[str]:
    """A directory set aside for a replacement: gone if the replacement arrived, else moved back."""
    aside = os.path.join(run_dir, ASIDE_DIR, entry_name)
    parts = split_internal(entry_name)
    name = names.get(parts[0]) if parts else None
    if name is None:
        return []  # no record names it: left for a person (walk reports it)
    target = os.path.join(run_dir, name)
    if os.path.lexists(target):  # the replacement arrived: the old one and its records go
        storage.remove_tree(aside)
        return [aside, *remove_records(storage, run_dir, name, keep=parts[1])]  # type: ignore[index]
    storage.rename_noreplace(aside, target)  # it never arrived: the old one takes its name back
    storage.sync_dir(run_dir)
    return [f"rolled back {target}"]


def _names_by_stem(run_dir: str) -> dict[str, str]:
    names = {stem(r.manifest.name): r.manifest.name for r in read_records(run_dir) if r.manifest is not None}
    for entry_name in _listdir(run_dir):
        names.setdefault(stem(entry_name), entry_name)
    return names


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(storage: Storage, path: str, done: list[str]) -> None:
    if not os.path.lexists(path):
        return
    try:
        storage.remove_tree(path)
        done.append(path)
    except OSError as exc:
        import logging

        logging.getLogger(__name__).warning("[ckptmgr] %s: could not remove leftover: %s", path, exc)


__all__ = ["ManifestFields", "StagedCheckpoint", "abandon", "publish_record", "recover", "remove_records",
           "sync_and_hash"]
