"""CheckpointManager: one run directory, one writer.

The manager orchestrates; the details live below it: names (naming), the
commit protocol (commit), verification and resolution (verify, catalog),
retention policies (retention), the writer lock (lock) and the run journal.

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from . import catalog
from .catalog import Candidate, Checkpoint
from .commit import ManifestFields, StagedCheckpoint, abandon
from .errors import (
    CommitError,
    ConfigMismatchError,
    InvalidCheckpointError,
    NoValidCheckpointError,
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
    checkpoint_name,
    is_staging,
    is_trash,
    parse_name,
    staging_name,
    trash_name,
    versioned,
)
from .retention import KeepEpochEnds, KeepEveryNSteps, KeepLast, RetentionPolicy, select_for_deletion
from .storage import DurabilityHook, LocalStorage, NoDurabilityHook, Storage
from .verify import verify_checkpoint

log = logging.getLogger(__name__)

PAYLOAD_NAME = "checkpoint.pt"
# One id per process: every manager of one training invocation journals under it.
PROCESS_INVOCATION = uuid.uuid4().hex[:12]


class Staging:
    """What ``CheckpointManager.stage`` yields: a directory to write into."""

    def __init__(self, staged: StagedCheckpoint):
        self._staged = staged
        self.target = ""
        self.checkpoint: Checkpoint | None = None  # set once committed

    @property
    def path(self) -> str:
        return self._staged.path

    def open_file(self, relpath: str):
        """Write a payload file hashed in one pass (preferred over writing by path)."""
        return self._staged.open_file(relpath)

    def save_torch(self, obj: Any, relpath: str, *, torch_crc32: bool = False) -> None:
        """``torch.save`` into a payload file, hashed beside the write, never read back (see payload.py).

        ``torch_crc32``: see ``CheckpointManager.torch_crc32``.
        """
        with _torch_crc32(torch_crc32):
            self._staged.save_torch(relpath, obj)

    def add_hashed(self, entries: Iterable[FileEntry]) -> None:
        """Entries hashed by the processes that wrote them (other ranks); fsynced by them."""
        self._staged.add_hashed(entries)


class CheckpointManager:
    """Atomic, verified checkpoints in one run directory."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_every_n_steps: int | None = None,
        keep_epochs: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        last_alias: str | None = LAST_NAME,
        config_fingerprint: str | None = None,
        storage: Storage | None = None,
        durability: DurabilityHook | None = None,
        durability_timeout_s: float = 600.0,
        lock_timeout_s: float = 0.0,
        workers: int | None = None,
        torch_crc32: bool = False,
    ):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.policies = _policies(keep_last, keep_every_n_steps, keep_epochs)
        if durability_timeout_s <= 0:
            raise UsageError(None, f"durability_timeout_s must be > 0, got {durability_timeout_s}")
        self.template = template
        self.last_alias = last_alias
        self.config_fingerprint = config_fingerprint
        self.storage: Storage = storage or LocalStorage()
        self.durability: DurabilityHook = durability or NoDurabilityHook()
        self.durability_timeout_s = durability_timeout_s
        self.workers = workers
        # torch.save computes a CRC32 per record, serially with the writes, that torch.load never
        # checks; our xxh3_128 covers every byte already. Off by default: saves run at disk speed.
        self.torch_crc32 = torch_crc32
        self.invocation = PROCESS_INVOCATION
        self._lock = WriterLock(self.run_dir, timeout=lock_timeout_s)
        self._sequence: int | None = None

    # -- writer lifecycle -------------------------------------------------
    def open(self) -> CheckpointManager:
        """Take the writer lock and clean up leftovers of crashed saves. Idempotent."""
        if self._lock.held:
            return self
        try:
            self.storage.makedirs(self.run_dir)
        except OSError as exc:
            raise from_os_error(self.run_dir, "creating the run directory", exc) from exc
        self._lock.acquire()
        self.cleanup()
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
    ) -> Checkpoint:
        """Save ``obj`` with ``torch.save`` as a single-payload checkpoint."""

        with self.stage(step=step, epoch=epoch, metadata=metadata, epoch_end=epoch_end, name=name,
                        kind="torch", load_path=PAYLOAD_NAME) as staging:
            staging.save_torch(obj, PAYLOAD_NAME, torch_crc32=self.torch_crc32)
        assert staging.checkpoint is not None
        return staging.checkpoint

    @contextmanager
    def stage(self, **fields: Any) -> Iterator[Staging]:
        """Yield a staging directory; leaving the block commits it, an exception abandons it.

        Takes the keyword arguments of :meth:`begin`.
        """
        handle = self.begin(**fields)
        try:
            yield handle
        except BaseException:
            self.abort(handle)
            raise
        self.commit(handle)

    def begin(
        self,
        *,
        step: int,
        epoch: int | None = None,
        metadata: dict[str, Any] | None = None,
        epoch_end: bool = False,
        name: str | None = None,
        kind: str = "files",
        load_path: str = ".",
        world_size: int = 1,
        layout: dict[str, Any] | None = None,
        staging_token: str | None = None,
    ) -> Staging:
        """Create a staging directory for a checkpoint (first half of :meth:`stage`).

        Several ranks may write into ``Staging.path``; one process then calls
        :meth:`commit` (after a barrier) or :meth:`abort`.
        """
        _check_step(step, epoch)
        self.open()
        target = name or checkpoint_name(step, epoch, self.template)
        fields = ManifestFields(
            step=step, epoch=epoch, kind=kind, load_path=load_path, epoch_end=epoch_end,
            world_size=world_size, layout=dict(layout or {}), config_fingerprint=self.config_fingerprint,
            metadata=dict(metadata or {}),
        )
        staged = StagedCheckpoint(self.storage, self.run_dir, staging_name(target, staging_token), fields,
                                  workers=self.workers)
        staged.create()
        handle = Staging(staged)
        handle.target = target
        return handle

    def commit(self, handle: Staging, *, replace: bool = False) -> Checkpoint:
        """Publish a staged checkpoint; returns once it is acknowledged.

        ``replace`` publishes under the target name even when a checkpoint of
        that name exists (Lightning without a version counter): the new one is
        published under a free name first, then the old one goes to trash and
        the new one takes its name, so a crash leaves one or both, never neither.
        """
        handle.checkpoint = self._commit(handle._staged, handle.target, replace=replace)
        return handle.checkpoint

    def abort(self, handle: Staging) -> None:
        """Abandon a staged checkpoint."""
        abandon(self.storage, handle.path)

    def _commit(self, staged: StagedCheckpoint, target: str, *, replace: bool = False) -> Checkpoint:
        sequence = self._next_sequence()
        name = self._free_name(target)
        try:
            path, manifest = staged.finalize(name=name, sequence=sequence)
        except BaseException:
            abandon(self.storage, staged.path)
            raise
        self._sequence = sequence
        if replace and name != target:
            path, name = self._take_name(path, target), target
        t0 = time.perf_counter()
        self._make_durable(path)
        durable_seconds = time.perf_counter() - t0
        # Acknowledged from here on: only now may `last` move and old checkpoints go.
        self._update_last(name)
        self._apply_retention(sequence)
        append_event(
            self.run_dir, "save", invocation=self.invocation, name=name, step=manifest.step,
            epoch=manifest.epoch, sequence=sequence, bytes=manifest.total_bytes,
            seconds=round(time.time() - staged.started, 6), durable_seconds=round(durable_seconds, 6),
        )
        return Checkpoint(path, manifest)

    def _next_sequence(self) -> int:
        if self._sequence is None:
            sequences = [c.manifest.sequence for c in catalog.scan(self.run_dir) if c.manifest]
            self._sequence = max(sequences, default=0)
        return self._sequence + 1

    def _free_name(self, target: str) -> str:
        name, version = target, 0
        while os.path.lexists(os.path.join(self.run_dir, name)):
            version += 1
            name = versioned(target, version)
        return name

    def _take_name(self, path: str, target: str) -> str:
        """Move a just-published checkpoint onto ``target``, retiring the old holder of that name."""
        self.delete(target)
        final = os.path.join(self.run_dir, target)
        try:
            self.storage.rename_noreplace(path, final)
            self.storage.sync_dir(self.run_dir)
        except OSError as exc:
            raise from_os_error(final, "renaming the checkpoint onto its name", exc) from exc
        return final

    def _make_durable(self, path: str) -> None:
        """Run the durability hook with a timeout; a failure means 'not acknowledged'."""
        outcome: list[BaseException | None] = []

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

    # -- last alias, retention, deletion ----------------------------------
    def point_last(self, name: str, *, alias: str | None = None) -> None:
        """Point the ``last`` alias (or another alias name) at checkpoint ``name``, atomically."""
        self.open()
        self._update_last(name, alias or self.last_alias or LAST_NAME)

    def _update_last(self, name: str, alias_name: str | None = None) -> None:
        alias_name = alias_name or self.last_alias
        if alias_name is None:
            return
        alias = os.path.join(self.run_dir, alias_name)
        tmp = os.path.join(self.run_dir, staging_name(alias_name))
        try:
            self._displace_foreign_last(alias)
            self.storage.symlink(name, tmp)
            self.storage.replace(tmp, alias)
            self.storage.sync_dir(self.run_dir)
        except OSError as exc:
            # `last` is only a hint; a failure to move it never fails the save.
            log.warning("[ckptmgr] %s: could not update the last alias: %s", alias, exc)
            abandon(self.storage, tmp)

    def _displace_foreign_last(self, alias: str) -> None:
        """A real file or directory under the alias name is user data: move it aside, never delete."""
        if os.path.islink(alias) or not os.path.lexists(alias):
            return
        aside = f"{alias}.displaced-{int(time.time())}"
        log.warning("[ckptmgr] %s is not an alias; moving it to %s", alias, aside)
        self.storage.rename_noreplace(alias, aside)

    def _apply_retention(self, just_committed: int) -> None:
        if not self.policies:
            return
        candidates = catalog.scan(self.run_dir)
        managed = [c for c in candidates if c.manifest and c.alias_of is None and not parse_name(c.name).is_last]
        protected = set()
        target = catalog.last_target(self.run_dir, self.last_alias) if self.last_alias else None
        by_name = {c.name: c for c in managed}
        if target in by_name:
            protected.add(by_name[target].manifest.sequence)  # type: ignore[union-attr]
        ordered = [c.manifest for c in managed]
        doomed = select_for_deletion(ordered, self.policies, just_committed=just_committed, protected=protected)
        by_sequence = {c.manifest.sequence: c for c in managed}  # type: ignore[union-attr]
        for manifest in doomed:
            self.delete(by_sequence[manifest.sequence].path)

    def delete(self, path: str) -> None:
        """Delete a checkpoint crash-safely: rename to a trash name first, then remove."""
        self.open()
        path = os.path.join(self.run_dir, os.path.basename(path))
        trash = os.path.join(self.run_dir, trash_name(os.path.basename(path)))
        try:
            self.storage.rename_noreplace(path, trash)
            self.storage.sync_dir(self.run_dir)
        except OSError as exc:
            raise from_os_error(path, "moving a checkpoint to trash", exc) from exc
        try:
            self.storage.remove_tree(trash)
        except OSError as exc:
            log.warning("[ckptmgr] %s: left in trash, removal failed: %s", trash, exc)
        append_event(self.run_dir, "delete", invocation=self.invocation, name=os.path.basename(path))

    def quarantine(self, path: str, reason: str) -> str:
        """Move a corrupt checkpoint aside into .ckptmgr/quarantine/ (never deleted)."""
        self.open()
        qdir = os.path.join(self.run_dir, QUARANTINE_DIR)
        dest = os.path.join(qdir, f"{os.path.basename(path)}.{int(time.time())}")
        try:
            self.storage.makedirs(qdir)
            self.storage.rename_noreplace(path, dest)
            self.storage.sync_dir(self.run_dir)
            self.storage.sync_dir(qdir)
        except OSError as exc:
            raise from_os_error(path, "quarantining a corrupt checkpoint", exc) from exc
        log.warning("[ckptmgr] quarantined %s -> %s: %s", path, dest, reason)
        append_event(self.run_dir, "quarantine", invocation=self.invocation, name=os.path.basename(path),
                     reason=reason)
        return dest

    def cleanup(self) -> list[str]:
        """Remove staging and trash leftovers of crashed saves (lock holder only)."""
        removed = []
        with os.scandir(self.run_dir) as entries:
            leftovers = [e.path for e in entries if is_staging(e.name) or is_trash(e.name)]
        for path in leftovers:
            try:
                self.storage.remove_tree(path)
                removed.append(path)
            except OSError as exc:
                log.warning("[ckptmgr] %s: could not remove leftover: %s", path, exc)
        return removed

    # -- reading ----------------------------------------------------------
    def checkpoints(self, *, quick: bool = False) -> list[Candidate]:
        """Every candidate, newest first, each verified (``.result``)."""
        candidates = catalog.scan(self.run_dir)
        for c in candidates:
            if c.alias_of is None and (c.manifest is not None or c.legacy):
                try:
                    c.result = verify_checkpoint(c.path, quick=quick, workers=self.workers)
                except Exception as exc:  # a vanished or foreign entry: report, don't stop
                    c.problem = str(exc)
        return candidates

    def resolve(self, *, quick: bool = False, quarantine: bool = False, strict: bool = False) -> Checkpoint | None:
        """The newest checkpoint that verifies.

        ``quarantine`` moves corrupt candidates newer than the pick aside
        (writer only). Nothing is moved when no candidate is valid: then the
        directory is left exactly as found, for a person to inspect.
        ``strict`` raises :class:`NoValidCheckpointError` when candidates exist
        but none verifies, instead of returning None.
        """
        skipped: list[tuple[Candidate, str]] = []
        found = catalog.resolve(self.run_dir, quick=quick, on_skip=lambda c, r: skipped.append((c, r)))
        if quarantine and found is not None:
            for candidate, reason in skipped:
                if not candidate.legacy and candidate.order_key > _key(found):
                    self.quarantine(candidate.path, reason)
        if found is None and strict and skipped:
            details = "; ".join(f"{c.name}: {r}" for c, r in skipped)
            raise NoValidCheckpointError(self.run_dir, f"{len(skipped)} candidate(s), none valid ({details})",
                                         hint="inspect with `ckptmgr list`; start fresh only on purpose")
        return found

    def load(self, checkpoint: Checkpoint | None = None, *, map_location: Any = "cpu",
             weights_only: bool = True, force_config: bool = False) -> Any:
        """Load the newest intact single-payload checkpoint (or ``checkpoint``), verified.

        Resolution hashes each candidate (one read of its bytes; a corrupt one is
        skipped, and quarantined when this manager holds the writer lock); the
        pick is then loaded memory-mapped from the pages that read left in the
        cache, so a resume pays one pass over the data, not two.
        """
        if checkpoint is None:
            checkpoint = self.resolve(quarantine=self.holds_lock, strict=True)
            if checkpoint is None:
                raise NoValidCheckpointError(self.run_dir, "no checkpoint to load")
        else:
            result = verify_checkpoint(checkpoint.path, workers=self.workers)
            if not result.valid:
                raise InvalidCheckpointError(checkpoint.path, result.reason)
        return self._load_payload(checkpoint, map_location, weights_only, force_config)

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
    try:
        policies: list[RetentionPolicy] = [KeepEpochEnds(n=keep_epochs), KeepLast(n=keep_last)]
        if every_n is not None:
            policies.append(KeepEveryNSteps(n=every_n))
    except ValueError as exc:
        raise UsageError(None, str(exc)) from exc
    return policies
