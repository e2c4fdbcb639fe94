"""Two containers sharing one Volume (a clustered run): every container commits its own writes before rank 0
publishes, or the checkpoint is refused, never published without a rank's shard.

Each rank is a real process (gloo) with its own view of a simulated Volume (ckptmgr.modal_sim.SimVolume):
it sees the committed state at its start and its own writes, nothing of the other container's until that
one commits and this one reloads.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ckptmgr import CheckpointManager, CommitError
from ckptmgr.catalog import resolve
from ckptmgr.commit import sync_and_hash
from ckptmgr.deepspeed import gather_and_commit
from ckptmgr.modal import VolumeCommit
from ckptmgr.modal_sim import SimVolume
from ckptmgr.storage import LocalStorage

LAYOUT = {"shards": {"0": ["rank0.bin"], "1": ["rank1.bin"]}}


class _Hashed:
    """What a ShardHasher reports: the files this rank wrote, fsynced and hashed."""

    def __init__(self, staging: str, name: str):
        self.staging, self.name = staging, name

    def entries(self, rank: int, world_size: int):
        return sync_and_hash(LocalStorage(), self.staging, [self.name])


def _container(rank: int, root: str, port: int, per_node_commit: bool, errors) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        view = os.path.join(root, "containers", f"node{rank}")
        shutil.copytree(os.path.join(root, "volume"), view)
        volume = SimVolume(root, view)
        manager = handle = None
        box = [None]
        if rank == 0:
            manager = CheckpointManager(os.path.join(view, "run"), keep_last=None, last_alias=None,
                                        durability=VolumeCommit(volume))
            handle = manager.begin(step=7, kind="files", world_size=2, layout=LAYOUT)
            box = [os.path.relpath(handle.path, view)]
        dist.broadcast_object_list(box, src=0)
        staging = os.path.join(view, box[0])
        os.makedirs(staging, exist_ok=True)  # the other container's view does not have it yet
        with open(os.path.join(staging, f"rank{rank}.bin"), "wb") as f:
            f.write(bytes([rank]) * 100_000)
        try:
            gather_and_commit(manager, handle, staging, rank=rank, world_size=2, layout=LAYOUT,
                              hasher=_Hashed(staging, f"rank{rank}.bin"), local_rank=0,  # one container per rank
                              node_commit=volume.commit if per_node_commit else None,
                              before_publish=volume.reload if per_node_commit else None)
        except CommitError as exc:
            errors.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("per_node_commit", [True, False], ids=["containers-commit", "without"])
def test_every_container_commits_before_rank_0_publishes(per_node_commit, tmp_path):
    root = str(tmp_path / "sim")
    os.makedirs(os.path.join(root, "volume"))
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_container, args=(root, _free_port(), per_node_commit, errors), nprocs=2, start_method="spawn")
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    committed_run = os.path.join(root, "volume", "run")
    if per_node_commit:
        assert not failures
        found = resolve(committed_run)  # what any container sees after a reload: both shards, verified
        assert found is not None and found.step == 7
        assert sorted(f.path for f in found.manifest.files) == ["rank0.bin", "rank1.bin"]
    else:
        # Rank 0 cannot see rank 1's shard: the save is refused on both ranks, nothing is published.
        assert sorted(rank for rank, _ in failures) == [0, 1] and all("not committed" in e for _, e in failures)
        assert resolve(committed_run) is None if os.path.isdir(committed_run) else True
