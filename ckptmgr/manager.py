"""CheckpointManager: one run directory, one writer.

The manager orchestrates; the details live below it: names (naming), the
commit protocol and crash recovery (commit), verification and resolution
(verify, catalog), retention policies (retention), the ``last`` alias
(aliases), the writer lock (lock) and the run journal.

A save is *acknowledged* (``save`` returns, the ``stage`` block exits) only
after the checkpoint is published, synced and the durability hook returned.
Only then is ``last`` moved and retention run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import aliases, catalog
from .catalog import Candidate, Checkpoint
from .commit import ManifestFields, StagedCheckpoint, abandon, recover, remove_records
from .errors import (
    CommitError,
    ConfigMismatchError,
    InvalidCheckpointError,
    NoValidCheckpointError,
    PathNotFoundError,
    UsageError,
    from_os_error,
)
from .journal import append_event
from .lock import WriterLock
from .manifest import FileEntry
from .naming import (
    DEFAULT_TEMPLATE,
    LAST_NAME,
    QUARANTINE_DIR,
    STAGING_DIR,
    TRASH_DIR,
    check_checkpoint_name,
    checkpoint_name,
    internal_name,
    new_token,
    parse_name,
    versioned,
)
from .records import read_records
from .retention import KeepEpochEnds, KeepEveryNSteps, KeepLast, RetentionPolicy, select_for_deletion
from .storage import LOCAL_READER, DurabilityHook, LocalStorage, NoDurabilityHook, Reader, Storage
from .verify import Status, verify_checkpoint

log = logging.getLogger(__name__)

# One id per process: every manager of one training invocation journals under it.
PROCESS_INVOCATION = uuid.uuid4().hex[:12]


class Staging:
    """What ``CheckpointManager.stage``/``begin`` yields: where to write one checkpoint."""

    def __init__(self, staged: StagedCheckpoint):
        self._staged = staged
        self.target = staged.name
        self.checkpoint: Checkpoint | None = None  # set once committed
        self.submitted = False  # handed to a background writer (async saves), which commits or abandons it

    @property
    def path(self) -> str:
        """The staging file (single-file checkpoint) or directory; never hand it to users."""
        return self._staged.path

    def open_file(self, relpath: str | None = None):
        """Write a payload file hashed in one pass (``relpath`` in a directory; none for a single file)."""
        return self._staged.open_file(relpath)

    def save_torch(self, obj: Any, relpath: str | None = None, *, torch_crc32: bool = False) -> None:
        """``torch.save`` into a payload file, hashed beside the write, never read back (see payload.py).

        ``torch_crc32``: see ``CheckpointManager.torch_crc32``.
        """
        with _torch_crc32(torch_crc32):
            self._staged.save_torch(relpath, obj)

    def add_hashed(self, entries: Iterable[FileEntry]) -> None:
        """Entries hashed by the processes that wrote them (other ranks); fsynced by them."""
        self._staged.add_hashed(entries)

    def set_layout(self, layout: dict[str, Any]) -> None:
        """The layout to record, when it is known only once written (DCP's ``.metadata`` names the files)."""
        self._staged.fields.layout = dict(layout)


class CheckpointManager:
    """Atomic, verified checkpoints in one run directory.

    Args:
        run_dir: the run directory; created by the first save.
        keep_last: retention: keep the newest N checkpoints (None: keep every checkpoint, no retention at all).
        keep_every_n_steps: retention: also keep checkpoints whose step is a multiple of N.
        keep_epochs: retention: also keep the newest N epoch-end checkpoints (saved with ``epoch_end=True``);
            None keeps every one of them, 0 none.
        retention: instead of the three above, a sequence of policies (``KeepLast``, ``KeepEveryNSteps``,
            ``KeepEpochEnds`` or your own); a checkpoint is kept if any policy keeps it.
        template: checkpoint name template (``epoch={epoch}-step={step}``, Lightning's default).
        last_alias: name of the ``last`` alias moved after every save (None: no alias).
        config_fingerprint: recorded in every checkpoint; ``load`` refuses a checkpoint of another fingerprint.
        storage: the write seam (tests inject faults through it).
        reader: the read seam (tests inject read faults through it).
        durability: called after each publish (a Modal ``Volume.commit()``); the save is acknowledged after it.
        durability_timeout_s: a durability hook that has not returned by then fails the save.
        lock_timeout_s: how long to wait for another writer's lock (0: refuse at once).
        workers: hashing threads (default: cores, at most 8).
        torch_crc32: keep torch's serial per-record CRC32 in saved files (off: xxh3_128 covers every byte).

    Retention deletes only checkpoints that the policies you configure do not keep, and never the
    newest one or the one resolve would pick; with the defaults that is all but the newest 3 periodic
    checkpoints (epoch-end ones are all kept).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_every_n_steps: int | None = None,
        keep_epochs: int | None = None,
        retention: Sequence[RetentionPolicy] | None = None,
        template: str = DEFAULT_TEMPLATE,
        last_alias: str | None = LAST_NAME,
        config_fingerprint: str | None = None,
        storage: Storage | None = None,
        reader: Reader | None = None,
        durability: DurabilityHook | None = None,
        durability_timeout_s: float = 600.0,
        lock_timeout_s: float = 0.0,
        workers: int | None = None,
        torch_crc32: bool = False,
    ):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        if retention is not None:
            self.policies: list[RetentionPolicy] = list(retention)
        else:
            self.policies = _policies(keep_last, keep_every_n_steps, keep_epochs)
        if durability_timeout_s <= 0:
            raise UsageError(None, f"durability_timeout_s must be > 0, got {durability_timeout_s}")
        if last_alias is not None and check_checkpoint_name(last_alias):
            raise UsageError(None, f"last_alias: {check_checkpoint_name(last_alias)}")
        self.template = template
        self.last_alias = last_alias
        self.config_fingerprint = config_fingerprint
        self.storage: Storage = storage or LocalStorage()
        self.reader: Reader = reader or LOCAL_READER
        self.durability: DurabilityHook = durability or NoDurabilityHook()
        self.durability_timeout_s = durability_timeout_s
        self.workers = workers
        # torch.save computes a CRC32 per record, serially with the writes, that torch.load never
        # checks; our xxh3_128 covers every byte already. Off by default: saves run at disk speed.
        self.torch_crc32 = torch_crc32
        self.invocation = PROCESS_INVOCATION
        self._lock = WriterLock(self.run_dir, timeout=lock_timeout_s)
        self._sequence: int | None = None
        self._links: aliases.LinkSupport | None = None

    # -- writer lifecycle -------------------------------------------------
    def open(self) -> CheckpointManager:
        """Take the writer lock, then recover what crashed saves left. Idempotent.

        The lock comes first: nothing is read, moved or cleaned before this process is the one writer.
        """
        if self._lock.held:
            return self
        if os.path.lexists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise UsageError(self.run_dir, "the run directory path exists and is not a directory")
        try:
            self.storage.makedirs(self.run_dir)
        except OSError as exc:
            raise from_os_error(self.run_dir, "creating the run directory", exc) from exc
        self._lock.acquire()
        try:
            self.cleanup()
            self._links = aliases.probe(self.storage, self.run_dir)
        except BaseException:
            self._lock.release()
            raise
        append_event(self.run_dir, "open", invocation=self.invocation, pid=os.getpid())
        return self

    def close(self) -> None:
        if self._lock.held:
            append_event(self.run_dir, "close", invocation=self.invocation)
            self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def holds_lock(self) -> bool:
        return self._lock.held

    # -- saving -----------------------------------------------------------
    def save(
        self,
        obj: Any,
        *,
        step: int,
        epoch: int | None = None,
        metadata: dict[str, Any] | None = None,
        epoch_end: bool = False,
        name: str | None = None,
        replace: bool = False,
        kind: str = "torch",
    ) -> Checkpoint:
        """``torch.save(obj)`` as the single-file checkpoint ``RUN/<name>`` (a plain torch file).

        ``name`` defaults to the template; a name that is taken gets ``-vN`` unless ``replace``.
        """
        with self.stage(step=step, epoch=epoch, metadata=metadata, epoch_end=epoch_end, name=name, kind=kind,
                        shape="file", replace=replace) as staging:
            staging.save_torch(obj, torch_crc32=self.torch_crc32)
        assert staging.checkpoint is not None
        return staging.checkpoint

    @contextmanager
    def stage(self, *, replace: bool = False, **fields: Any) -> Iterator[Staging]:
        """Yield a staging area; leaving the block commits it, an exception abandons it.

        Takes the keyword arguments of :meth:`begin` (a directory checkpoint unless ``shape="file"``).
        """
        handle = self.begin(**fields)
        try:
            yield handle
        except BaseException:
            self.abort(handle)
            raise
        self.commit(handle, replace=replace)

    def begin(
        self,
        *,
        step: int,
        epoch: int | None = None,
        metadata: dict[str, Any] | None = None,
        epoch_end: bool = False,
        name: str | None = None,
        kind: str = "files",
        shape: str = "directory",
        load_path: str = ".",
        world_size: int = 1,
        layout: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> Staging:
        """Create the staging area of a checkpoint (first half of :meth:`stage`).

        Several ranks may write into ``Staging.path`` (a directory); one process
        then calls :meth:`commit` (after a barrier) or :meth:`abort`.
        """
        _check_step(step, epoch)
        target = name or checkpoint_name(step, epoch, self.template)
        problem = check_checkpoint_name(target)
        if problem is not None:
            raise UsageError(os.path.join(self.run_dir, str(target)), problem)
        if shape not in ("file", "directory"):
            raise UsageError(None, f"shape must be 'file' or 'directory', got {shape!r}")
        self.open()
        fields = ManifestFields(
            step=step, epoch=epoch, kind=kind, load_path=load_path, epoch_end=epoch_end,
            world_size=world_size, layout=dict(layout or {}), config_fingerprint=self.config_fingerprint,
            metadata=dict(metadata or {}),
        )
        staged = StagedCheckpoint(self.storage, self.run_dir, target, token or new_token(), fields, shape=shape,
                                  workers=self.workers)
        staged.create()
        return Staging(staged)

    def adopt(self, name: str, *, step: int, epoch: int | None = None, kind: str | None = None,
              metadata: dict[str, Any] | None = None, **fields: Any) -> Checkpoint:
        """Commit a checkpoint that someone else wrote in place at ``RUN/<name>`` (commit-marker mode).

        Its files are fsynced and hashed where they lie and the commit record is published last: the
        bytes are never moved. Used by ``ckptmgr seal`` and for strategies that write their own files.
        """
        _check_step(step, epoch)
        self.open()
        name = self._own_name(name)
        directory = os.path.isdir(os.path.join(self.run_dir, name))
        fields = ManifestFields(step=step, epoch=epoch, kind=kind or ("files" if directory else "torch"),
                                config_fingerprint=self.config_fingerprint, metadata=dict(metadata or {}), **fields)
        staged = StagedCheckpoint(self.storage, self.run_dir, name, new_token(), fields,
                                  shape="directory" if directory else "file", workers=self.workers)
        sequence = self._next_sequence()
        path, manifest = staged.finalize_in_place(sequence=sequence)
        self._sequence = sequence
        self._make_durable(path)
        append_event(self.run_dir, "save", invocation=self.invocation, name=name, step=step, epoch=epoch,
                     sequence=sequence, bytes=manifest.total_bytes, seconds=0.0, durable_seconds=0.0)
        return Checkpoint(path, manifest)

    def commit(self, handle: Staging, *, replace: bool = False) -> Checkpoint:
        """Publish a staged checkpoint; returns once it is acknowledged.

        ``replace`` publishes under the target name even when a checkpoint of
        that name exists (Lightning without a version counter): a crash at any
        point leaves the old one or the new one resolvable, never neither.
        """
        handle.checkpoint = self._commit(handle._staged, replace=replace)
        return handle.checkpoint

    def abort(self, handle: Staging) -> None:
        """Abandon a staged checkpoint."""
        abandon(self.storage, handle.path)

    def _commit(self, staged: StagedCheckpoint, *, replace: bool = False) -> Checkpoint:
        sequence = self._next_sequence()
        name = staged.name if replace else self._free_name(staged.name)
        try:
            path, manifest = staged.finalize(name=name, sequence=sequence, replace=replace)
        except BaseException:
            abandon(self.storage, staged.path)
            raise
        self._sequence = sequence
        durable_seconds = self._make_durable(path)
        # Acknowledged from here on: only now may `last` move and old checkpoints go.
        checkpoint = Checkpoint(path, manifest)
        self._update_last(checkpoint)
        self._apply_retention(sequence)
        append_event(
            self.run_dir, "save", invocation=self.invocation, name=name, step=manifest.step,
            epoch=manifest.epoch, sequence=sequence, bytes=manifest.total_bytes,
            seconds=round(time.time() - staged.started, 6), durable_seconds=round(durable_seconds, 6),
        )
        return checkpoint

    def _next_sequence(self) -> int:
        if self._sequence is None:
            sequences = [c.manifest.sequence for c in catalog.scan(self.run_dir, self.reader) if c.manifest]
            self._sequence = max(sequences, default=0)
        return self._sequence + 1

    def _free_name(self, target: str) -> str:
        taken = {r.manifest.name for r in read_records(self.run_dir, self.reader) if r.manifest is not None}
        name, version = target, 0
        while name in taken or os.path.lexists(os.path.join(self.run_dir, name)):
            version += 1
            name = versioned(target, version)
        return name

    def _make_durable(self, path: str) -> float:
        """Run the durability hook with a timeout; a failure means 'not acknowledged'. Returns its seconds."""
        outcome: list[BaseException | None] = []
        started = time.perf_counter()

        def run() -> None:
            try:
                self.durability.persist(path)
                outcome.append(None)
            except BaseException as exc:  # carried to the caller's thread below
                outcome.append(exc)

        worker = threading.Thread(target=run, name="ckptmgr-durability", daemon=True)
        worker.start()
        worker.join(self.durability_timeout_s)
        if not outcome:
            raise CommitError(path, f"durability hook did not return within {self.durability_timeout_s:g} s; "
                                    "the save is not acknowledged")
        if outcome[0] is not None:
            raise CommitError(path, f"durability hook failed ({outcome[0]!r}); the save is not acknowledged") \
                from outcome[0]
        return time.perf_counter() - started

    # -- the last alias -----------------------------------------------------
    def point_last(self, name: str, *, alias: str | None = None, style: str = aliases.COPY) -> str | None:
        """Make ``alias`` (default: ``last_alias``) an alias of checkpoint ``name``; returns how (or None).

        ``style``: ``"copy"`` (a hard link with its own commit record, or a full copy where links are not
        supported) or ``"link"`` (a symlink, or the copy style where symlinks are not supported).
        """
        self.open()
        path = os.path.join(self.run_dir, self._own_name(name))
        result = verify_checkpoint(path, quick=True, reader=self.reader)
        if not result.valid or result.manifest is None:
            raise InvalidCheckpointError(path, f"not a valid checkpoint to alias: {result.reason}")
        return self._update_last(Checkpoint(path, result.manifest), alias or self.last_alias or LAST_NAME,
                                 style=style, strict=True)

    def _update_last(self, target: Checkpoint, alias_name: str | None = None, *, style: str = aliases.COPY,
                     strict: bool = False) -> str | None:
        alias_name = alias_name or self.last_alias
        if alias_name is None or alias_name == target.name:
            return None
        problem = check_checkpoint_name(alias_name)
        if problem is not None:
            raise UsageError(os.path.join(self.run_dir, alias_name), problem)
        try:
            return self._publish_alias(alias_name, target, style)
        except (OSError, CommitError) as exc:
            if strict:
                raise
            # `last` is an alias: a failure to move it never fails the save it follows.
            log.warning("[ckptmgr] %s: could not update the alias: %s", os.path.join(self.run_dir, alias_name), exc)
            return None

    def _publish_alias(self, alias_name: str, target: Checkpoint, style: str) -> str:
        manifest = target.manifest
        support = self._links or aliases.probe(self.storage, self.run_dir)
        kind = support.kind_for(style, directory=not manifest.is_file)
        alias = os.path.join(self.run_dir, alias_name)
        self._displace_foreign(alias)
        if kind == aliases.SYMLINK:
            self._swap_in_symlink(alias, target.name)
            remove_records(self.storage, self.run_dir, alias_name)
            return kind
        fields = ManifestFields(step=manifest.step, epoch=manifest.epoch, kind=manifest.kind,
                                load_path=manifest.load_path, epoch_end=manifest.epoch_end,
                                world_size=manifest.world_size, layout=dict(manifest.layout),
                                config_fingerprint=manifest.config_fingerprint, metadata=dict(manifest.metadata),
                                alias_of=target.name)
        staged = StagedCheckpoint(self.storage, self.run_dir, alias_name, new_token(), fields, shape=manifest.shape,
                                  workers=self.workers)
        try:
            staged.create()
            staged.link_from(target.path, manifest.files, hard_links=kind == aliases.HARDLINK)
            if os.path.islink(alias):
                self.storage.unlink(alias)  # a symlink alias before: the copy takes its place
            staged.finalize(name=alias_name, sequence=manifest.sequence, replace=True)
        except BaseException:
            abandon(self.storage, staged.path)
            raise
        return kind

    def _swap_in_symlink(self, alias: str, name: str) -> None:
        tmp = os.path.join(self.run_dir, STAGING_DIR, internal_name(os.path.basename(alias), new_token()))
        try:
            self.storage.makedirs(os.path.dirname(tmp))
            if os.path.isdir(alias) and not os.path.islink(alias):
                self._delete(os.path.basename(alias))  # a directory copy before: the symlink replaces it
            self.storage.symlink(name, tmp)
            self.storage.replace(tmp, alias)
            self.storage.sync_dir(self.run_dir)
        except BaseException:
            abandon(self.storage, tmp)
            raise

    def _displace_foreign(self, alias: str) -> None:
        """A real file or directory under the alias name that ckptmgr did not make is user data: moved aside."""
        if os.path.islink(alias) or not os.path.lexists(alias):
            return
        name = os.path.basename(alias)
        ours = any((r.manifest.name == name) if r.manifest is not None else r.stem == name
                   for r in read_records(self.run_dir, self.reader))
        if ours:
            return  # a managed checkpoint under that name: the protocol replaces it
        aside = f"{alias}.displaced-{int(time.time())}"
        log.warning("[ckptmgr] %s is not a ckptmgr alias; moving it to %s (nothing deleted)", alias, aside)
        self.storage.rename_noreplace(alias, aside)

    # -- retention, deletion, quarantine ------------------------------------
    def _apply_retention(self, just_committed: int) -> None:
        if not self.policies:
            return
        managed = [c for c in catalog.scan(self.run_dir, self.reader)
                   if c.manifest is not None and c.form in (catalog.MANAGED, catalog.IN_DIR) and not c.is_alias
                   and not parse_name(c.name).is_last and os.path.lexists(c.path)]
        protected = {c.manifest.sequence for c in managed if c.name in self._alias_targets()}  # type: ignore[union-attr]
        ordered = [c.manifest for c in managed]
        doomed = select_for_deletion(ordered, self.policies, just_committed=just_committed, protected=protected)
        by_sequence = {c.manifest.sequence: c for c in managed}  # type: ignore[union-attr]
        for manifest in doomed:
            self._delete(by_sequence[manifest.sequence].name)

    def _alias_targets(self) -> set[str]:
        """Names the `last` alias points to (a symlink's target, or the checkpoint an alias copies)."""
        targets = set()
        for candidate in catalog.scan(self.run_dir, self.reader):
            if candidate.alias_of is not None:
                targets.add(os.path.basename(candidate.alias_of))
            elif candidate.manifest is not None and candidate.manifest.alias_of is not None:
                targets.add(candidate.manifest.alias_of)
        return targets

    def delete(self, name: str, *, force: bool = False) -> None:
        """Delete a checkpoint of this run crash-safely (to trash first, then removed).

        ``name`` is a checkpoint name or a path inside the run directory. Refuses the newest
        valid checkpoint and the one resolve would pick, unless ``force``.
        """
        self.open()
        name = self._own_name(name)
        if not force:
            pick = self.resolve()
            if pick is not None and pick.name == name:
                raise UsageError(os.path.join(self.run_dir, name), "refusing to delete the newest valid checkpoint "
                                 "(the one resume would pick)", hint="pass force=True to delete it anyway")
        self._delete(name)

    def _own_name(self, name: str) -> str:
        name = os.fspath(name)
        if os.sep in name or "/" in name:
            if os.path.dirname(os.path.abspath(name)) != self.run_dir:
                raise UsageError(name, f"not a checkpoint of this run directory ({self.run_dir})")
            name = os.path.basename(name)
        problem = check_checkpoint_name(name)
        if problem is not None:
            raise UsageError(os.path.join(self.run_dir, name), problem)
        if not os.path.lexists(os.path.join(self.run_dir, name)):
            raise PathNotFoundError(os.path.join(self.run_dir, name), "no such checkpoint")
        return name

    def _delete(self, name: str) -> None:
        """Rename to trash (the name is free at once), remove the records, then the bytes."""
        path = os.path.join(self.run_dir, name)
        trash = os.path.join(self.run_dir, TRASH_DIR, internal_name(name, new_token()))
        try:
            self.storage.makedirs(os.path.dirname(trash))
            self.storage.rename_noreplace(path, trash)
            self.storage.sync_dir(self.run_dir)
            remove_records(self.storage, self.run_dir, name)
        except OSError as exc:
            raise from_os_error(path, "moving a checkpoint to trash", exc) from exc
        try:
            self.storage.remove_tree(trash)
        except OSError as exc:
            log.warning("[ckptmgr] %s: left in trash, removal failed: %s", trash, exc)
        append_event(self.run_dir, "delete", invocation=self.invocation, name=name)

    def quarantine(self, name: str, reason: str) -> str:
        """Move a corrupt checkpoint and its records into .ckptmgr/quarantine/ (never deleted)."""
        self.open()
        name = os.path.basename(os.fspath(name))
        dest = os.path.join(self.run_dir, QUARANTINE_DIR, f"{internal_name(name, new_token())}.{int(time.time())}")
        path = os.path.join(self.run_dir, name)
        try:
            self.storage.makedirs(dest)
            if os.path.lexists(path):
                self.storage.rename_noreplace(path, os.path.join(dest, name))
                self.storage.sync_dir(self.run_dir)
            for record in read_records(self.run_dir, self.reader):
                if (record.manifest.name == name) if record.manifest is not None else record.stem == name:
                    self.storage.rename_noreplace(record.path, os.path.join(dest, record.filename))
            self.storage.sync_dir(dest)
        except OSError as exc:
            raise from_os_error(path, "quarantining a corrupt checkpoint", exc) from exc
        log.warning("[ckptmgr] quarantined %s -> %s: %s", path, dest, reason)
        append_event(self.run_dir, "quarantine", invocation=self.invocation, name=name, reason=reason)
        return dest

    def cleanup(self) -> list[str]:
        """Roll back or remove what crashed saves left (lock holder only)."""
        try:
            return recover(self.storage, self.run_dir)
        except OSError as exc:
            raise from_os_error(self.run_dir, "recovering after an interrupted save", exc) from exc

    # -- reading ----------------------------------------------------------
    def checkpoints(self, *, quick: bool = False) -> list[Candidate]:
        """Every candidate, newest first, each verified (``.result``) and classified (``.status``)."""
        if not os.path.isdir(self.run_dir):
            return []
        candidates, _ = catalog.inspect(self.run_dir, quick=quick, workers=self.workers, reader=self.reader)
        return candidates

    def resolve(self, *, quick: bool = False, quarantine: bool = False, strict: bool = False) -> Checkpoint | None:
        """The newest checkpoint that verifies; None when there is none (or no run directory yet).

        ``quarantine`` moves corrupt candidates newer than the pick aside
        (writer only). Nothing is moved when no candidate is valid: then the
        directory is left exactly as found, for a person to inspect.
        ``strict`` raises :class:`NoValidCheckpointError` when candidates exist
        but none verifies, instead of returning None.
        """
        if not os.path.lexists(self.run_dir):
            return None
        skipped: list[tuple[Candidate, str]] = []
        found = catalog.resolve(self.run_dir, quick=quick, on_skip=lambda c, r: skipped.append((c, r)),
                                reader=self.reader, workers=self.workers)
        if quarantine and found is not None:
            for candidate, reason in skipped:
                corrupt = candidate.result.status is Status.CORRUPT if candidate.result is not None else \
                    candidate.form in (catalog.MANAGED, catalog.IN_DIR)  # a record or manifest that does not parse
                if corrupt and candidate.order_key > _key(found):
                    self.quarantine(candidate.name, reason)
        if found is None and strict and skipped:
            details = "; ".join(f"{c.name}: {r}" for c, r in skipped)
            raise NoValidCheckpointError(self.run_dir, f"{len(skipped)} candidate(s), none valid ({details})",
                                         hint="inspect with `ckptmgr list`; start fresh only on purpose")
        return found

    def load(self, checkpoint: Checkpoint | Candidate | str | None = None, *, map_location: Any = "cpu",
             weights_only: bool = True, force_config: bool = False) -> Any:
        """Load the newest intact single-file checkpoint (or the one given: a Checkpoint, a candidate from
        :meth:`checkpoints`, a name or a path), verified.

        Resolution hashes each candidate (one read of its bytes; a corrupt one is
        skipped, and quarantined when this manager holds the writer lock); the
        pick is then loaded memory-mapped from the pages that read left in the
        cache, so a resume pays one pass over the data, not two.
        """
        return self._load_payload(self.verified(checkpoint), map_location, weights_only, force_config)

    def verified(self, checkpoint: Checkpoint | Candidate | str | None = None) -> Checkpoint:
        """The checkpoint to load, verified now: the newest intact one, or the one given (a name or a path).

        Raises :class:`NoValidCheckpointError` when there is none, :class:`InvalidCheckpointError` when the
        one given does not verify.
        """
        if checkpoint is None:
            found = self.resolve(quarantine=self.holds_lock, strict=True)
            if found is None:
                raise NoValidCheckpointError(self.run_dir, "no checkpoint to load")
            return found
        path = checkpoint.path if isinstance(checkpoint, (Checkpoint, Candidate)) else \
            os.path.join(self.run_dir, os.fspath(checkpoint))
        result = verify_checkpoint(path, workers=self.workers, reader=self.reader)
        if not result.valid or result.manifest is None:
            raise InvalidCheckpointError(path, f"refusing to load: {result.reason}")
        return Checkpoint(path, result.manifest)

    def _load_payload(self, checkpoint: Checkpoint, map_location: Any, weights_only: bool,
                      force_config: bool) -> Any:
        """``torch.load`` of a verified checkpoint, memory-mapped (old pickle-format files are read)."""
        import torch

        self.check_config(checkpoint, force=force_config)
        if not os.path.isfile(checkpoint.load_path):
            raise UsageError(checkpoint.path, f"a {checkpoint.manifest.kind!r} checkpoint is not one torch file; "
                                              "load Checkpoint.load_path with its own loader")
        with open(checkpoint.load_path, "rb") as f:
            mappable = f.read(4) == b"PK\x03\x04"
        return torch.load(checkpoint.load_path, map_location=map_location, weights_only=weights_only,
                          mmap=mappable)

    def check_config(self, checkpoint: Checkpoint, *, force: bool = False) -> None:
        theirs = checkpoint.manifest.config_fingerprint
        if self.config_fingerprint is None or theirs is None or theirs == self.config_fingerprint:
            return
        if force:
            log.warning("[ckptmgr] %s: config fingerprint differs (%s != %s); loading anyway (forced)",
                        checkpoint.path, theirs, self.config_fingerprint)
            return
        raise ConfigMismatchError(checkpoint.path, f"written by another experiment config (fingerprint {theirs}, "
                                                   f"this run {self.config_fingerprint})",
                                  hint="resume with the original config, or force it")


_CRC_LOCK = threading.Lock()


@contextmanager
def _torch_crc32(enabled: bool) -> Iterator[None]:
    """torch's CRC32 setting is process-wide: set it for one save, under a lock, and restore it."""
    import torch.serialization as serialization

    setter = getattr(serialization, "set_crc32_options", None)
    if setter is None or enabled:
        yield
        return
    with _CRC_LOCK:
        previous = serialization.get_crc32_options()
        setter(False)
        try:
            yield
        finally:
            setter(previous)


def _key(checkpoint: Checkpoint) -> tuple[int, int, int]:
    return (checkpoint.step, checkpoint.sequence, 1)


def _check_step(step: int, epoch: int | None) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UsageError(None, f"step must be a non-negative int, got {step!r}")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0):
        raise UsageError(None, f"epoch must be a non-negative int or None, got {epoch!r}")


def _policies(keep_last: int | None, every_n: int | None, keep_epochs: int | None) -> list[RetentionPolicy]:
    """``keep_last=None`` turns retention off: every checkpoint is kept."""
    if keep_last is None:
        return []
    policies: list[RetentionPolicy] = [KeepEpochEnds(n=keep_epochs), KeepLast(n=keep_last)]
    if every_n is not None:
        policies.append(KeepEveryNSteps(n=every_n))
    return policies
