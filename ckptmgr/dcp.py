"""PyTorch Distributed Checkpoint (DCP) through the manager: FSDP2, torchtitan-style training.

    from ckptmgr import CheckpointManager, dcp as managed_dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    manager = CheckpointManager("runs/exp1")               # on every rank; only rank 0 opens it
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    managed_dcp.save(state, manager, step=step)             # like dcp.save(state, checkpoint_id=...)
    future = managed_dcp.async_save(state, manager, step=step)   # like dcp.async_save
    checkpoint = managed_dcp.load(state, manager)           # newest verified checkpoint, then dcp.load

What ckptmgr adds to DCP, which writes ``.metadata`` last and never checks a byte on load:

- Every rank writes its ``__R_N.distcp`` files into one staging directory of the run through DCP's
  own filesystem writer, each file hashed (chunked xxh3_128) on its way to disk and fsynced by DCP:
  nothing is read back.
- The hashes reach the coordinator inside DCP's own write results (the gather DCP does anyway).
  There, once DCP has written ``.metadata``, the checkpoint is committed: every file ``.metadata``
  names must have been written and hashed by its rank, then the commit record is published and the
  directory renamed into place. A failure on any rank reaches every rank through DCP's own error
  handling, as a :class:`CommitError`; nothing half-written is ever published.
- :func:`load` verifies on rank 0 (every file against the manifest, falling back past a corrupt
  checkpoint to the newest intact one) before DCP reads a byte; then every rank loads, resharding
  when the world size changed, as DCP does.

The manager is used on the coordinator (rank 0 of ``process_group``); elsewhere it is never opened.
At most one save is in flight per process: a new call waits for the previous ``async_save``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.storage import WriteResult

from .catalog import Checkpoint
from .dcp_layout import METADATA_NAME, read_metadata, shards_by_rank
from .errors import CkptMgrError, CommitError, ConfigMismatchError
from .hashing import ChunkedHasher
from .manager import CheckpointManager, Staging
from .manifest import FileEntry

KIND = "dcp"
_pending: Future | None = None  # this process's async save, until it has finished
_pending_lock = threading.Lock()


# -- writing: DCP's filesystem writer, hashing as it writes --------------------------------
_BESIDE_MIN_BYTES = 1 << 20  # a write this large is hashed by a helper thread while it goes to disk
_hash_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckptmgr-dcp-hash")


class _HashingStream(io.IOBase):
    """A file DCP writes: every byte hashed on its way to ``raw`` (DCP itself seeks only by ``tell``).

    A large write (a tensor's bytes) is hashed by a helper thread while this thread writes the same
    buffer; both release the GIL, so the hash costs no time beside the write. The write returns only once
    its hash is done, so the buffer is never read after DCP reuses it, and updates stay in order.
    """

    def __init__(self, raw: Any):
        self._raw = raw
        self.hasher = ChunkedHasher()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) < _BESIDE_MIN_BYTES:
            self.hasher.update(view)
            written = self._raw.write(view)
        else:
            hashed = _hash_pool.submit(self.hasher.update, view)
            try:
                written = self._raw.write(view)
            finally:
                hashed.result()
        return written if written is not None else len(view)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes through to raw
            self._raw.close()


class _HashingFileSystem(FileSystem):
    """DCP's local filesystem; remembers each file written under ``root`` with its size and digest."""

    def __init__(self, root: str):
        super().__init__()
        self.root = root
        self._lock = threading.Lock()  # DCP writes with ``thread_count`` threads
        self._written: dict[str, FileEntry] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = _HashingStream(raw)
            yield stream
        relpath = os.path.relpath(os.fspath(path), self.root)
        with self._lock:
            self._written[relpath] = FileEntry(path=relpath, size=stream.hasher.size,
                                               xxh3_128=stream.hasher.hexdigest())

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP writes ``.metadata.tmp`` and renames it
        old, new = (os.path.relpath(os.fspath(p), self.root) for p in (path, new_path))
        with self._lock:
            entry = self._written.pop(old, None)
            if entry is not None:
                self._written[new] = dataclasses.replace(entry, path=new)

    def take_written(self) -> dict[str, FileEntry]:
        with self._lock:
            written, self._written = self._written, {}
        return written


@dataclasses.dataclass(frozen=True)
class _Hashed:
    """A write result's storage data, travelling to the coordinator with the digest of its file."""

    info: Any  # DCP's own storage data for the item (restored before ``.metadata`` is written)
    entry: FileEntry | None


class ManagedStorageWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` into a manager's staging directory, every file hashed as written.

    On the coordinator, ``finish`` writes ``.metadata`` (hashed too) and then calls ``on_finish`` with every
    rank's entries and DCP's metadata: the commit. Accepts ``FileSystemWriter``'s options.
    """

    def __init__(self, staging: str, *, on_finish: Callable[[dict[str, FileEntry], Any], Checkpoint] | None = None,
                 **options: Any):
        options.setdefault("sync_files", True)
        if not options["sync_files"]:
            raise CkptMgrError(staging, "sync_files=False cannot make a checkpoint durable; leave it on")
        super().__init__(staging, **options)
        self.fs = _HashingFileSystem(os.fspath(staging))
        self.on_finish = on_finish
        self.checkpoint: Checkpoint | None = None

    def write_data(self, plan: Any, planner: Any) -> Any:
        written = super().write_data(plan, planner)
        written.wait()  # DCP's filesystem writer has finished every file when it returns
        entries = self.fs.take_written()
        results = [WriteResult(r.index, r.size_in_bytes, _Hashed(r.storage_data, entries.get(
            getattr(r.storage_data, "relative_path", "")))) for r in written.value()]
        from torch.futures import Future as TorchFuture

        future: TorchFuture = TorchFuture()
        future.set_result(results)
        return future

    def finish(self, metadata: Any, results: list[list[WriteResult]]) -> None:
        entries: dict[str, FileEntry] = {}
        plain = []
        for rank_results in results:
            plain.append([self._unwrap(r, entries) for r in rank_results])
        super().finish(metadata, plain)
        entries.update(self.fs.take_written())  # .metadata
        if self.on_finish is not None:
            self.checkpoint = self.on_finish(entries, metadata)

    @staticmethod
    def _unwrap(result: WriteResult, entries: dict[str, FileEntry]) -> WriteResult:
        hashed = result.storage_data
        if not isinstance(hashed, _Hashed):
            return result
        if hashed.entry is not None:
            entries[hashed.entry.path] = hashed.entry
        return dataclasses.replace(result, storage_data=hashed.info)


# -- the calls ---------------------------------------------------------------------------
def save(state_dict: dict[str, Any], manager: CheckpointManager, *, step: int, epoch: int | None = None,
         name: str | None = None, metadata: dict[str, Any] | None = None, replace: bool = False,
         planner: Any = None, process_group: Any = None, **writer_options: Any) -> Checkpoint | None:
    """``dcp.save`` as one managed checkpoint. A collective: every rank calls it.

    Returns the committed checkpoint on the coordinator, None on the other ranks. ``writer_options`` go to
    DCP's ``FileSystemWriter`` (``thread_count``, ``per_thread_copy_ahead``, ...).
    """
    import torch.distributed.checkpoint as dcp

    wait_for_pending()
    writer, handle = _begin(manager, step, epoch, name, metadata, replace, process_group, writer_options)
    try:
        dcp.save(state_dict, storage_writer=writer, planner=planner, process_group=process_group,
                 no_dist=_single_process())
    except BaseException as exc:
        _abort(manager, handle)
        raise _as_commit_error(exc, writer) from exc
    return writer.checkpoint


def async_save(state_dict: dict[str, Any], manager: CheckpointManager, *, step: int, epoch: int | None = None,
               name: str | None = None, metadata: dict[str, Any] | None = None, replace: bool = False,
               planner: Any = None, process_group: Any = None, async_stager: Any = None,
               **writer_options: Any) -> Future:
    """``dcp.async_save`` as one managed checkpoint. A collective: every rank calls it.

    Returns once the state is staged in CPU memory (the stall); the returned future resolves, once the
    checkpoint is committed, to the checkpoint on the coordinator and None elsewhere, or raises
    :class:`CommitError`. As with DCP, ``process_group`` must have a CPU backend (gloo). The state is staged
    as ``dcp.async_save(state, checkpoint_id=...)`` stages it (DCP's ``DefaultStager``), or by ``async_stager``.
    """
    import torch.distributed.checkpoint as dcp

    global _pending
    wait_for_pending()
    writer, handle = _begin(manager, step, epoch, name, metadata, replace, process_group, writer_options)
    stager, owned_stager = _stager(async_stager)
    try:
        response = dcp.async_save(state_dict, storage_writer=writer, planner=planner, process_group=process_group,
                                  no_dist=_single_process(), **({"async_stager": stager} if stager else {}))
    except BaseException as exc:
        _abort(manager, handle)
        if owned_stager:
            stager.close()
        raise _as_commit_error(exc, writer) from exc
    upload = getattr(response, "upload_completion", response)  # newer torch: an AsyncSaveResponse
    done: Future = Future()

    def settle(finished: Future) -> None:
        if owned_stager:
            stager.close()
        try:
            finished.result()
        except BaseException as exc:
            _abort(manager, handle)
            done.set_exception(_as_commit_error(exc, writer))
        else:
            done.set_result(writer.checkpoint)

    with _pending_lock:
        _pending = done
    upload.add_done_callback(settle)
    return done


def wait_for_pending() -> None:
    """Wait for this process's ``async_save`` in flight; raise its error if it failed (once)."""
    global _pending
    with _pending_lock:
        pending, _pending = _pending, None
    if pending is not None:
        pending.result()


def load(state_dict: dict[str, Any], manager: CheckpointManager, *, checkpoint: Checkpoint | str | None = None,
         planner: Any = None, process_group: Any = None) -> Checkpoint:
    """Verify, then ``dcp.load`` into ``state_dict`` in place. A collective: every rank calls it.

    Rank 0 resolves the newest checkpoint that verifies (or verifies the one given, by name or path)
    before any rank reads a byte of it; every rank raises the same error when there is none. The world
    size may differ from the save's: DCP reshards.
    """
    import torch.distributed.checkpoint as dcp

    wait_for_pending()
    found = _on_coordinator(process_group, lambda: _verified_dcp(manager, checkpoint))
    dcp.load(state_dict, checkpoint_id=found.load_path, planner=planner, process_group=process_group,
             no_dist=_single_process())
    return found


# -- helpers -------------------------------------------------------------------------------
def _stager(given: Any) -> tuple[Any, bool]:
    """The stager for an async save, and whether it is ours to close.

    Handed a ``FileSystemWriter`` (ours is one), ``dcp.async_save`` would stage through the writer's own
    blocking stager, several times slower than the ``DefaultStager`` it uses for ``checkpoint_id=``; so that
    one is passed, as DCP builds it, where this torch accepts ``async_stager`` (2.8 and later).
    """
    import inspect

    import torch.distributed.checkpoint as dcp

    if given is not None:
        return given, False
    if "async_stager" not in inspect.signature(dcp.async_save).parameters:
        return None, False
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:  # a torch with async_stager but before DefaultStager: the writer stages
        return None, False
    return DefaultStager(StagingOptions(False, False, False, False)), True


def _single_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def _rank_and_world(process_group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if _single_process():
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _on_coordinator(process_group: Any, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 of the group and hand its result (or its CkptMgrError) to every rank."""
    import torch.distributed as dist

    rank, world = _rank_and_world(process_group)
    box: list[Any] = [None]
    if rank == 0:
        try:
            box = [work()]
        except CkptMgrError as exc:  # every rank must learn of it, or the others wait for ever
            box = [exc]
    if world > 1:
        source = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        dist.broadcast_object_list(box, src=source, group=process_group)
    if isinstance(box[0], CkptMgrError):
        raise box[0]
    return box[0]


def _begin(manager: CheckpointManager, step: int, epoch: int | None, name: str | None,
           metadata: dict[str, Any] | None, replace: bool, process_group: Any,
           writer_options: dict[str, Any]) -> tuple[ManagedStorageWriter, Staging | None]:
    """Rank 0 creates the staging directory; every rank gets a writer into it."""
    rank, world = _rank_and_world(process_group)
    handle: Staging | None = None

    def begin() -> str:
        nonlocal handle
        handle = manager.begin(step=step, epoch=epoch, name=name, kind=KIND, world_size=world,
                               layout={"format": KIND}, metadata=metadata)
        return handle.path

    staging = _on_coordinator(process_group, begin)
    on_finish = None
    if rank == 0:
        def on_finish(entries: dict[str, FileEntry], dcp_metadata: Any) -> Checkpoint:
            assert handle is not None
            return _commit(manager, handle, entries, replace)
    try:
        return ManagedStorageWriter(staging, on_finish=on_finish, **writer_options), handle
    except BaseException:
        _abort(manager, handle)
        raise


def _commit(manager: CheckpointManager, handle: Staging, entries: dict[str, FileEntry], replace: bool) -> Checkpoint:
    """The coordinator, after ``.metadata`` is written: every file it names hashed by its rank; then commit.

    ``.metadata`` is read back from the staging directory (a small file, in page cache): what is checked is
    exactly what DCP's loader will read, whatever this torch version did to the object in memory.
    """
    described = read_metadata(handle.path)
    unhashed = sorted((described.files | {METADATA_NAME}) - set(entries))
    if unhashed:
        raise CommitError(handle.path, f"files named in {METADATA_NAME} were not written and hashed: {unhashed}")
    handle.set_layout({"format": KIND, "shards": shards_by_rank(described)})
    handle.add_hashed(entries.values())
    return manager.commit(handle, replace=replace)


def _abort(manager: CheckpointManager, handle: Staging | None) -> None:
    if handle is not None and handle.checkpoint is None:
        manager.abort(handle)


def _as_commit_error(exc: BaseException, writer: ManagedStorageWriter) -> BaseException:
    """DCP's CheckpointException (a failure on some rank) as one CommitError naming each rank's failure."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return exc
    parts = []
    for rank, failure in sorted(failures.items()):
        error = failure[0] if isinstance(failure, tuple) else failure
        text = str(error) if isinstance(error, CkptMgrError) else f"{type(error).__name__}: {error}"
        parts.append(f"rank {rank}: {text.splitlines()[0] if text else type(error).__name__}")
    return CommitError(os.fspath(writer.path), f"DCP checkpoint not committed: {'; '.join(parts)}")


def _verified_dcp(manager: CheckpointManager, checkpoint: Checkpoint | str | None) -> Checkpoint:
    found = manager.verified(checkpoint)
    if found.manifest.kind != KIND:
        raise ConfigMismatchError(found.path, f"a {found.manifest.kind!r} checkpoint, not a DCP one",
                                  hint="load it with the loader that wrote it")
    return found


__all__ = ["KIND", "ManagedStorageWriter", "async_save", "load", "save", "wait_for_pending"]
