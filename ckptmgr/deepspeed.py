"""DeepSpeed ZeRO checkpoints through the manager, with or without Lightning.

Every rank writes its own shards into one staging directory, hashes the files
it wrote (from page cache, in parallel with the other ranks), and reports the
entries to rank 0, which checks that every rank's shards are there and
publishes one manifest covering them all. The manifest records the world size,
ZeRO stage and each rank's shard list, so a checkpoint missing a rank's shard
never verifies and a resume under another world size is refused by name.

    from ckptmgr.deepspeed import save, load
    save(engine, manager, step=engine.global_steps)          # every rank calls it
    checkpoint, client_state = load(engine, manager)         # resolve (verified) + load_checkpoint
"""

from __future__ import annotations

import re
from typing import Any

from .catalog import Checkpoint
from .commit import sync_and_hash
from .errors import CommitError, ConfigMismatchError, InvalidCheckpointError, NoValidCheckpointError
from .manager import CheckpointManager
from .manifest import FileEntry
from .storage import LocalStorage, Storage
from .verify import list_tree, missing_shards

DEFAULT_TAG = "checkpoint"
_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")


def owner_rank(relpath: str) -> int:
    """The data-parallel rank that wrote a file of DeepSpeed's layout (rank 0 for shared files)."""
    match = _RANK_FILE.search(relpath)
    return int(match.group(1)) if match else 0


def hash_own_files(staging: str, rank: int, world_size: int, storage: Storage | None = None) -> list[FileEntry]:
    """Hash the files this rank wrote; rank 0 also takes the shared ones (latest, scripts)."""
    files, _ = list_tree(staging)
    mine = sorted(p for p in files if owner_rank(p) % max(world_size, 1) == rank)
    # The writer's own fsync: on network filesystems only the writer's counts.
    return sync_and_hash(storage or LocalStorage(), staging, list(mine))


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


def check_shards(layout: dict[str, Any], files: set[str], where: str) -> None:
    """Refuse to publish a checkpoint that lacks a rank's shard."""
    missing = missing_shards(layout, files)
    if missing:
        raise InvalidCheckpointError(where, f"shards missing: {missing}")


def gather_and_commit(manager: CheckpointManager | None, handle: Any, staging: str, *, rank: int,
                      world_size: int, layout: dict[str, Any], replace: bool = False) -> Checkpoint | None:
    """Collective: hash own files, gather at rank 0, which checks shards and commits."""
    import torch.distributed as dist

    entries = hash_own_files(staging, rank, world_size, manager.storage if manager is not None else None)
    gathered: list[Any] = [None] * world_size
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        dist.all_gather_object(gathered, entries)
    else:
        gathered = [entries]
    checkpoint = None
    error: str | None = None
    if rank == 0:
        assert manager is not None and handle is not None
        reported = {e.path: e for rank_entries in gathered for e in rank_entries}
        try:
            check_shards(layout, set(reported), staging)
            handle.add_hashed(reported.values())
            checkpoint = manager.commit(handle, replace=replace)
        except (InvalidCheckpointError, CommitError) as exc:
            manager.abort(handle)
            error = str(exc)
    outcome = [error]
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CommitError(staging, f"DeepSpeed checkpoint not committed: {outcome[0]}")
    return checkpoint


def save(engine: Any, manager: CheckpointManager, *, step: int, epoch: int | None = None, tag: str = DEFAULT_TAG,
         client_state: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Checkpoint | None:
    """Save a DeepSpeed engine as one managed checkpoint. A collective: every rank calls it.

    Returns the checkpoint on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    rank, world_size = engine.global_rank, engine.world_size
    stage = int(engine.zero_optimization_stage())
    layout = {"zero_stage": stage, "tag": tag, "dp_world_size": world_size,
              "shards": expected_shards(tag, world_size, stage, bf16=bool(engine.bfloat16_enabled()))}
    handle = None
    box: list[Any] = [None]
    if rank == 0:
        handle = manager.begin(step=step, epoch=epoch, kind="deepspeed", load_path=".", world_size=world_size,
                               layout=layout, metadata=metadata)
        box = [handle.path]
    if dist.is_initialized() and world_size > 1:
        dist.broadcast_object_list(box, src=0)
    staging = box[0]
    engine.save_checkpoint(staging, tag=tag, client_state=client_state or {})
    if dist.is_initialized():
        dist.barrier()
    return gather_and_commit(manager if rank == 0 else None, handle, staging, rank=rank, world_size=world_size,
                             layout=layout)


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
