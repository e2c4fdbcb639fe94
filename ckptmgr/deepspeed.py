"""DeepSpeed ZeRO checkpoints through the manager, with or without Lightning.

Every rank writes its own shards into one staging directory, fsyncs and hashes
each file it wrote as soon as DeepSpeed has finished it (from page cache, while
the engine serialises the next one; :class:`ShardHasher`), and reports the
entries to rank 0, which checks that every rank's shards are there and
publishes one manifest covering them all (``ckptmgr.collective``).
The manifest records the world size, ZeRO stage and each rank's shard list, so
a checkpoint missing a rank's shard never verifies and a resume under another
world size is refused by name.

    from ckptmgr.deepspeed import save, load
    save(engine, manager, step=engine.global_steps)          # every rank calls it
    checkpoint, client_state = load(engine, manager)         # resolve (verified) + load_checkpoint
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .catalog import Checkpoint
from .collective import check_shards, gather_and_commit, missing_shards, owned_files
from .commit import sync_and_hash
from .errors import ConfigMismatchError, NoValidCheckpointError
from .manager import CheckpointManager
from .manifest import FileEntry
from .storage import LocalStorage, Storage

DEFAULT_TAG = "checkpoint"
_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")


def owner_rank(relpath: str) -> int:
    """The data-parallel rank that wrote a file of DeepSpeed's layout (rank 0 for shared files)."""
    match = _RANK_FILE.search(relpath)
    return int(match.group(1)) if match else 0


class ShardHasher:
    """fsync and hash each file DeepSpeed writes into ``staging`` as soon as it is complete.

    The engine writes every file of a checkpoint through its checkpoint
    engine's ``save(state_dict, path)``; with the default
    ``TorchCheckpointEngine`` the file is complete when that call returns. For
    the length of the ``with`` block that call is wrapped, and a background
    thread fsyncs and hashes each finished file (its chunks in parallel, from
    page cache) while the engine serialises the next one. Files written some
    other way (``latest``, the copied ``zero_to_fp32.py``) and every file of an
    engine that writes asynchronously are hashed by :meth:`entries` afterwards.

        with ShardHasher(engine, staging) as hasher:
            engine.save_checkpoint(staging, tag=tag)
        entries = hasher.entries(rank, world_size)
    """

    def __init__(self, engine: Any, staging: str, storage: Storage | None = None):
        self.staging = staging
        self.storage = storage or LocalStorage()
        self.hashed_as_written: dict[str, Future[list[FileEntry]]] = {}
        self._engine = getattr(engine, "checkpoint_engine", None)
        # One file at a time keeps completion order; hash_files spreads each file's chunks over threads.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptmgr-shard-hash")
        self._wrapped = False

    def __enter__(self) -> ShardHasher:
        engine = self._engine
        # Only an engine whose save() returns with the file written: an asynchronous one would race the hash.
        if engine is not None and type(engine).__name__ == "TorchCheckpointEngine" and "save" not in vars(engine):
            write = engine.save

            def save_then_hash(state_dict: Any, path: str) -> None:
                write(state_dict, path)
                self._finished(path)

            engine.save = save_then_hash
            self._wrapped = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._wrapped:
            del self._engine.save  # the class's method again
            self._wrapped = False
        # Never leave a thread reading a staging directory that may be about to be removed.
        self._pool.shutdown(wait=True)

    def _finished(self, path: str) -> None:
        relpath = os.path.relpath(path, self.staging)
        if relpath.startswith(os.pardir):
            return  # not part of this checkpoint
        # A file written again is hashed again; the pool runs in order, so the last hash is of the last write.
        self.hashed_as_written[relpath] = self._pool.submit(sync_and_hash, self.storage, self.staging, [relpath])

    def entries(self, rank: int, world_size: int) -> list[FileEntry]:
        """Every file this rank is responsible for, hashed: those it wrote, and its share of the rest."""
        entries: dict[str, FileEntry] = {}
        for future in self.hashed_as_written.values():
            entries.update((entry.path, entry) for entry in future.result())
        rest = owned_files(self.staging, rank, world_size, owner_rank, skip=set(self.hashed_as_written))
        entries.update((entry.path, entry) for entry in sync_and_hash(self.storage, self.staging, rest))
        return sorted(entries.values(), key=lambda entry: entry.path)


def expected_shards(tag: str, world_size: int, stage: int, *, bf16: bool = False) -> dict[str, list[str]]:
    """Each rank's shard files in DeepSpeed's layout (tensor parallelism of 1).

    With bf16 DeepSpeed prefixes the optimizer shards with ``bf16_`` (``engine._get_zero_ckpt_prefix``).
    """
    shards: dict[str, list[str]] = {}
    optim_prefix = "bf16_" if bf16 else ""
    for rank in range(world_size):
        files = [f"{tag}/{optim_prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
        if stage == 3:
            files.append(f"{tag}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        shards[str(rank)] = files
    if stage < 3:
        shards["0"].append(f"{tag}/mp_rank_00_model_states.pt")
    return shards


def save(engine: Any, manager: CheckpointManager, *, step: int, epoch: int | None = None, tag: str = DEFAULT_TAG,
         client_state: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Checkpoint | None:
    """Save a DeepSpeed engine as one managed checkpoint. A collective: every rank calls it.

    Returns the checkpoint on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    rank, world_size = engine.global_rank, engine.world_size
    handle, staging, layout = begin_save(engine, manager, step=step, epoch=epoch, tag=tag, metadata=metadata)
    with ShardHasher(engine, staging, manager.storage) as hasher:
        engine.save_checkpoint(staging, tag=tag, client_state=client_state or {})
    if dist.is_initialized():
        dist.barrier()
    return gather_and_commit(manager if rank == 0 else None, handle, staging, rank=rank, world_size=world_size,
                             layout=layout, hasher=hasher, what="DeepSpeed")


def begin_save(engine: Any, manager: CheckpointManager | None, *, step: int, epoch: int | None, tag: str,
               metadata: dict[str, Any] | None) -> tuple[Any, str, dict[str, Any]]:
    """A collective: rank 0 begins the managed save; every rank gets (handle or None, staging dir, layout)."""
    import torch.distributed as dist

    rank, world_size = engine.global_rank, engine.world_size
    stage = int(engine.zero_optimization_stage())
    layout = {"zero_stage": stage, "tag": tag, "dp_world_size": world_size,
              "shards": expected_shards(tag, world_size, stage, bf16=bool(engine.bfloat16_enabled()))}
    handle = None
    box: list[Any] = [None]
    if rank == 0:
        assert manager is not None, "rank 0 needs the manager"
        handle = manager.begin(step=step, epoch=epoch, kind="deepspeed", load_path=".", world_size=world_size,
                               layout=layout, metadata=metadata)
        box = [handle.path]
    if dist.is_initialized() and world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return handle, box[0], layout


def load(engine: Any, manager: CheckpointManager, **load_kwargs: Any) -> tuple[Checkpoint, dict[str, Any]]:
    """Resolve the newest verified checkpoint and load it into ``engine``.

    Refuses a checkpoint written under another data-parallel world size.
    """
    checkpoint = manager.resolve(strict=True)
    if checkpoint is None:
        raise NoValidCheckpointError(manager.run_dir, "no checkpoint to load")
    check_world_size(checkpoint, engine.world_size)
    tag = checkpoint.manifest.layout.get("tag", DEFAULT_TAG)
    _, client_state = engine.load_checkpoint(checkpoint.path, tag=tag, **load_kwargs)
    return checkpoint, client_state or {}


def check_world_size(checkpoint: Checkpoint, world_size: int) -> None:
    written = checkpoint.manifest.world_size
    if written != world_size:
        stage = checkpoint.manifest.layout.get("zero_stage", "?")
        raise ConfigMismatchError(
            checkpoint.path, f"ZeRO-{stage} checkpoint written by {written} ranks; this run has {world_size}",
            hint=f"resume with {written} ranks, or `ckptmgr export` it to a full state dict and start from that")


# Defined in ckptmgr.collective (shared with the DCP path); importable from here as before.
__all__ = ["DEFAULT_TAG", "ShardHasher", "begin_save", "check_shards", "check_world_size", "expected_shards",
           "gather_and_commit", "load", "missing_shards", "owner_rank", "save"]
