"""A checkpoint every rank writes part of: each rank hashes its own files, rank 0 commits them all.

Sharded saves (DeepSpeed ZeRO, PyTorch Distributed Checkpoint) write one
staging directory from every rank. The rank that wrote a file fsyncs and
hashes it (from page cache, so no rank reads another's bytes), the entries are
gathered at rank 0, which checks that every file the layout names is there and
publishes one manifest covering them all. A rank that fails to hash reports
the error instead of raising it, so every rank raises it and none waits for the
others forever.

    hasher = OwnedFiles(staging, owner_rank=dcp_layout.owner_rank)   # or deepspeed.ShardHasher
    ... every rank writes into staging ...
    gather_and_commit(manager, handle, staging, rank=rank, world_size=world, layout=layout, hasher=hasher)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .catalog import Checkpoint
from .commit import sync_and_hash
from .errors import CkptMgrError, CommitError, InvalidCheckpointError
from .manager import CheckpointManager
from .manifest import FileEntry
from .storage import LocalStorage, Storage
from .verify import list_tree

ShardMap = dict[str, list[str]]  # rank (as a string, as JSON keys are) -> the files that rank wrote


class RankHasher(Protocol):
    def entries(self, rank: int, world_size: int) -> list[FileEntry]: ...


def owned_files(staging: str, rank: int, world_size: int, owner_rank: Callable[[str], int],
                skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The files in ``staging`` this rank answers for (``owner_rank`` modulo the world size), less ``skip``."""
    files, _ = list_tree(staging)
    return sorted(p for p in files if p not in skip and owner_rank(p) % max(world_size, 1) == rank)


class OwnedFiles:
    """Hash, after the save, the files this rank wrote (for writers ckptmgr cannot hash while they write)."""

    def __init__(self, staging: str, owner_rank: Callable[[str], int], storage: Storage | None = None):
        self.staging = staging
        self.owner_rank = owner_rank
        self.storage = storage or LocalStorage()

    def entries(self, rank: int, world_size: int) -> list[FileEntry]:
        mine = owned_files(self.staging, rank, world_size, self.owner_rank)
        return sync_and_hash(self.storage, self.staging, mine)


def missing_shards(layout: dict[str, Any], files: set[str]) -> list[str]:
    """Shards a sharded layout names that the file list lacks."""
    shards = layout.get("shards") or {}
    return sorted(f for rank_files in shards.values() for f in rank_files if f not in files)


def check_shards(layout: dict[str, Any], files: set[str], where: str) -> None:
    """Refuse to publish a checkpoint that lacks a rank's shard."""
    missing = missing_shards(layout, files)
    if missing:
        raise InvalidCheckpointError(where, f"shards missing: {missing}")


def gather_and_commit(manager: CheckpointManager | None, handle: Any, staging: str, *, rank: int,
                      world_size: int, layout: dict[str, Any], hasher: RankHasher, replace: bool = False,
                      expected: Callable[[], ShardMap] | None = None, what: str = "sharded",
                      local_rank: int | None = None, node_commit: Callable[[], None] | None = None,
                      before_publish: Callable[[], None] | None = None, group: Any = None) -> Checkpoint | None:
    """Collective: gather every rank's hashed files at rank 0, which checks the shards and commits.

    ``layout["shards"]`` names the files the checkpoint must hold; when they are known only once written
    (DCP's ``.metadata`` names them), ``expected`` is called on rank 0 to read them, and they are recorded.
    Every rank raises :class:`CommitError` when any rank failed to hash or rank 0 failed to commit.
    Several containers (a clustered run, each with its own view of a Volume): ``node_commit`` is called
    by every container's local rank 0 once all ranks have hashed, and ``before_publish`` (a Volume
    reload) by rank 0 after every container committed, before it publishes (see ckptmgr.modal).
    ``group``: the process group of the collectives (a background commit uses a gloo group of its own).
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and world_size > 1
    report: tuple[list[FileEntry], str | None]
    try:
        report = (hasher.entries(rank, world_size), None)
    except CkptMgrError as exc:  # reported, not raised: the other ranks are waiting in the gather
        report = ([], f"rank {rank}: {exc}")
    if node_commit is not None:
        from .modal import commit_every_node

        commit_every_node(local_rank=rank if local_rank is None else local_rank, node_commit=node_commit,
                          barrier=(lambda: dist.barrier(group=group)) if distributed else lambda: None)
    gathered: list[Any] = [None] * world_size
    if distributed:
        dist.all_gather_object(gathered, report, group=group)
    else:
        gathered = [report]
    if rank == 0 and before_publish is not None:
        before_publish()
    checkpoint = None
    error: str | None = None
    if rank == 0:
        assert manager is not None and handle is not None
        checkpoint, error = _commit_gathered(manager, handle, staging, gathered, layout, expected, replace)
    outcome = [error]
    if distributed:
        dist.broadcast_object_list(outcome, src=0, group=group)
    if outcome[0] is not None:
        raise CommitError(staging, f"{what} checkpoint not committed: {outcome[0]}")
    return checkpoint


def _commit_gathered(manager: CheckpointManager, handle: Any, staging: str, gathered: list[Any],
                     layout: dict[str, Any], expected: Callable[[], ShardMap] | None,
                     replace: bool) -> tuple[Checkpoint | None, str | None]:
    """Rank 0's half: every rank reported, every named shard is there; then one commit."""
    reported = {e.path: e for rank_entries, _ in gathered for e in rank_entries}
    failures = [failure for _, failure in gathered if failure is not None]
    if failures:
        manager.abort(handle)
        return None, "; ".join(failures)
    try:
        if expected is not None:
            layout = {**layout, "shards": expected()}
            handle.set_layout(layout)
        check_shards(layout, set(reported), staging)
        handle.add_hashed(reported.values())
        return manager.commit(handle, replace=replace), None
    except Exception as exc:  # whatever it is, the other ranks must hear of it, not wait for ever
        manager.abort(handle)
        if isinstance(exc, CkptMgrError):
            return None, exc.message if exc.path in (staging, None) else str(exc)
        return None, f"{exc.__class__.__name__}: {exc}"


__all__ = ["OwnedFiles", "RankHasher", "ShardMap", "check_shards", "gather_and_commit", "missing_shards",
           "owned_files"]
