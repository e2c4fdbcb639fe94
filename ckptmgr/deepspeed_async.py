"""Asynchronous DeepSpeed saves: every rank snapshots its shards and returns to training.

DeepSpeed hands every file of a checkpoint to its checkpoint engine as
``save(state_dict, path)``. For the length of ``engine.save_checkpoint`` the
engine's checkpoint engine is replaced by :class:`SnapshotCheckpointEngine`
(DeepSpeed's own plug-in point), which only starts a snapshot of each state
dict into reused pinned buffers (ckptmgr.snapshot: the copy overlaps the next
forward/backward; the next optimizer step waits for it). A background worker
on every rank then writes each file with ``torch.save``, exactly as
DeepSpeed's ``TorchCheckpointEngine`` would (same serialization, same storage
sharing, the same device recorded for every storage: byte for byte the same
file), fsyncs and hashes it right after it is written, and joins the
multi-rank commit of ckptmgr.collective on a gloo group of its own, so the
training's process group is never used from two threads. Rank 0 commits once
every rank has persisted; the outcome reaches every rank, and a failure is
raised by every rank's next save (or ``wait``), never a hang.

    saver = AsyncDeepSpeedSaver(engine, manager)        # every rank; manager on rank 0 (None elsewhere)
    saver.save(step=engine.global_steps)                # returns once the copies are issued
    ...
    saver.close()                                       # waits for the last commit
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from .async_save import AsyncCheckpointer
from .catalog import Checkpoint
from .collective import gather_and_commit, owned_files
from .commit import sync_and_hash
from .deepspeed import DEFAULT_TAG, begin_save, owner_rank
from .errors import CkptMgrError, CommitError
from .manager import CheckpointManager
from .manifest import FileEntry
from .snapshot import Snapshot, SnapshotBuffers
from .storage import LocalStorage, Storage

COMMIT_TIMEOUT = timedelta(minutes=30)  # a rank that died mid-persist fails the others' commit, not hangs it


class SnapshotCheckpointEngine:
    """Stands in for DeepSpeed's checkpoint engine during one save: ``save`` starts a snapshot, no I/O.

    Everything else is the wrapped engine's (loading, ``makedirs``, which rank writes).
    """

    def __init__(self, inner: Any, buffers: SnapshotBuffers):
        self.inner = inner
        self.buffers = buffers
        self.files: list[tuple[str, Snapshot]] = []  # (path, snapshot), in DeepSpeed's order

    def save(self, state_dict: Any, path: str) -> None:
        self.files.append((path, self.buffers.start(state_dict, prefix=os.path.basename(path))))

    def commit(self, info: Any) -> bool:
        return True  # the files are not written yet; ckptmgr's commit follows them

    def is_decoupled(self) -> bool:
        return False  # DeepSpeed writes `latest` itself, as with its default engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def zipfile_serialization(self) -> bool:
        return bool(getattr(self.inner, "zipfile_serialization", True))

    def writer(self, staging: str, storage: Storage) -> SnapshotFileWriter:
        return SnapshotFileWriter(self.files, staging, storage, self.zipfile_serialization)


class SnapshotFileWriter:
    """The background half: write every snapshotted file as DeepSpeed would have, then hash this rank's files.

    Used as the ``hasher`` of ``gather_and_commit``: whatever fails is reported, so every rank hears of it.
    """

    def __init__(self, files: list[tuple[str, Snapshot]], staging: str, storage: Storage, zipfile: bool):
        self.files = files
        self.staging = staging
        self.storage = storage
        self.zipfile = zipfile

    def entries(self, rank: int, world_size: int) -> list[FileEntry]:
        import torch

        written: list[str] = []
        # Each file is fsynced and hashed (from page cache) by a helper thread while the next one is written.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptmgr-ds-hash") as pool:
            hashed: list[Future[list[FileEntry]]] = []
            try:
                for path, snapshot in self.files:
                    torch.save(snapshot.wait(), path, _use_new_zipfile_serialization=self.zipfile)
                    written.append(os.path.relpath(path, self.staging))
                    hashed.append(pool.submit(sync_and_hash, self.storage, self.staging, written[-1:]))
                entries = [entry for future in hashed for entry in future.result()]
                rest = owned_files(self.staging, rank, world_size, owner_rank, skip=set(written))
                return sorted(entries + sync_and_hash(self.storage, self.staging, rest), key=lambda e: e.path)
            except CkptMgrError:
                raise
            except Exception as exc:  # reported to rank 0 through the gather, as any failure to persist
                raise CommitError(self.staging, f"background write failed: {exc.__class__.__name__}: {exc}") \
                    from exc


@contextmanager
def snapshotting(engine: Any, buffers: SnapshotBuffers) -> Iterator[SnapshotCheckpointEngine]:
    """For the ``with`` block, the engine's checkpoint engine only snapshots what it is asked to save."""
    inner = engine.checkpoint_engine
    stand_in = SnapshotCheckpointEngine(inner, buffers)
    engine.checkpoint_engine = stand_in
    try:
        yield stand_in
    finally:
        engine.checkpoint_engine = inner


_COMMIT_GROUPS: dict[tuple[int, ...], Any] = {}


def commit_group() -> Any:
    """A gloo group over every rank for background commits (created collectively, once per process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    key = tuple(range(dist.get_world_size()))
    if key not in _COMMIT_GROUPS:
        _COMMIT_GROUPS[key] = dist.new_group(backend="gloo", timeout=COMMIT_TIMEOUT)
    return _COMMIT_GROUPS[key]


class AsyncDeepSpeedSaver:
    """Asynchronous managed saves of a DeepSpeed engine; every rank makes one and calls its methods."""

    def __init__(self, engine: Any, manager: CheckpointManager | None, *, tag: str = DEFAULT_TAG,
                 saver: AsyncCheckpointer | None = None, storage: Storage | None = None):
        """``saver``: the worker to queue on (ManagedCheckpoint shares its own); ``storage``: where this
        rank writes (rank 0: the manager's)."""
        self.engine = engine
        self.storage = storage or (manager.storage if manager is not None else LocalStorage())
        self.manager = manager
        self.tag = tag
        self.saver = saver or AsyncCheckpointer(manager)
        self.group = commit_group()

    def save(self, *, step: int, epoch: int | None = None, client_state: dict[str, Any] | None = None,
             metadata: dict[str, Any] | None = None) -> None:
        """Snapshot this rank's shards and return; the previous save's failure is raised here, on every rank."""
        self.saver.wait()
        engine = self.engine
        handle, staging, layout = begin_save(engine, self.manager, step=step, epoch=epoch, tag=self.tag,
                                             metadata=metadata)
        try:
            self.snapshot_and_submit(
                lambda: engine.save_checkpoint(staging, tag=self.tag, client_state=client_state or {}),
                handle, staging, layout)
        except BaseException:
            if handle is not None:
                self.manager.abort(handle)  # type: ignore[union-attr]
            raise

    def snapshot_and_submit(self, save_checkpoint: Callable[[], Any], handle: Any, staging: str,
                            layout: dict[str, Any], *, replace: bool = False) -> None:
        """Run ``save_checkpoint`` (which calls ``engine.save_checkpoint`` into ``staging``) with the checkpoint
        engine only snapshotting, then queue the background write and commit of what it was given."""
        with snapshotting(self.engine, self.saver.buffers) as stand_in:
            save_checkpoint()
        writer = stand_in.writer(staging, self.storage)
        manager, group = self.manager, self.group
        rank, world_size = self.engine.global_rank, self.engine.world_size

        def persist() -> Checkpoint | None:
            return gather_and_commit(manager if rank == 0 else None, handle, staging, rank=rank,
                                     world_size=world_size, layout=layout, hasher=writer, replace=replace,
                                     what="DeepSpeed", group=group)

        if handle is not None:
            handle.submitted = True
        self.saver.submit_save(persist)

    def wait(self) -> Checkpoint | None:
        """Block until the save in flight is committed (on rank 0: the checkpoint); raise its error."""
        return self.saver.wait()

    def close(self) -> None:
        self.saver.close()
