"""ManagedCheckpoint under Lightning's sharded (DCP) strategies: real Trainers on 2 CPU processes.

ModelParallelStrategy with FSDP2 runs on CPU; FSDPStrategy (FSDP1) needs an accelerator, so it runs in
benchmarks/gpu/lightning_fsdp.py (docs/GPU.md). Both reach ManagedCheckpoint the same way: the strategy
writes Lightning's own DCP directory on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ckptmgr.lightning.checkpoint import _writes_dcp, _writes_shards
from ckptmgr.verify import Status, verify_checkpoint
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.xdist_group("dcp")

WORKER = os.path.join(REPO, "tests", "helpers", "lightning_dcp_worker.py")
ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")


def fit(out: str, max_steps: int, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, WORKER, out, str(max_steps), *extra], capture_output=True, text=True,
                          env=ENV, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("lightning-dcp"))
    report = fit(out, 6)
    assert report == {"started_at": 0, "global_step": 6, "resumed_from": None}
    return out


def test_every_save_is_lightnings_own_layout_committed(trained):
    checkpoints = os.path.join(trained, "checkpoints")
    assert sorted(n for n in os.listdir(checkpoints) if not n.startswith(".")) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    path = os.path.join(checkpoints, "epoch=0-step=6.ckpt")
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # not nested
    result = verify_checkpoint(path)
    assert result.status is Status.VALID
    assert result.manifest.kind == "dcp" and result.manifest.world_size == 2
    assert result.manifest.layout["strategy"] == "ModelParallelStrategy"
    assert result.manifest.layout["shards"] == {"0": [".metadata", "__0_0.distcp", "meta.pt"], "1": ["__1_0.distcp"]}
    assert run_cli("walk", checkpoints).returncode == 0


def test_dcps_own_loader_opens_the_committed_checkpoint(trained, tmp_path):
    path = os.path.join(trained, "checkpoints", "epoch=0-step=6.ckpt")
    FileSystemReader(path).read_metadata()
    dcp_to_torch_save(path, str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    assert full["state_dict"]["net.0.weight"].shape == (64, 16)
    assert "optimizer_0" in full


def test_resume_continues_from_the_newest(trained, tmp_path):
    out = str(tmp_path / "again")
    shutil.copytree(trained, out)
    report = fit(out, 8, "--resume")
    assert report["resumed_from"] == "epoch=0-step=6.ckpt" and report["started_at"] == 6
    assert report["global_step"] == 8
    assert verify_checkpoint(os.path.join(out, "checkpoints", "epoch=0-step=8.ckpt")).status is Status.VALID


def test_resume_falls_back_past_a_corrupt_shard(trained, tmp_path):
    out = str(tmp_path / "damaged")
    shutil.copytree(trained, out)
    checkpoints = os.path.join(out, "checkpoints")
    # One byte of rank 1's shard of the newest save, and of `last.ckpt`, which holds the same bytes (a hard
    # link in the run; the copy made them two files).
    for name in ("epoch=0-step=6.ckpt", "last.ckpt"):
        shard = os.path.join(checkpoints, name, "__1_0.distcp")
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
    report = fit(out, 8, "--resume")
    assert report["resumed_from"] == "epoch=0-step=4.ckpt" and report["started_at"] == 4
    assert report["global_step"] == 8
    # The corrupt ones were moved aside by the resume (quarantine), not deleted.
    quarantined = os.listdir(os.path.join(checkpoints, ".ckptmgr", "quarantine"))
    assert sorted(q.split(".ckpt")[0] for q in quarantined) == ["epoch=0-step=6", "last"]


def test_strategies_are_recognised_by_their_own_settings():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    assert _writes_shards(ModelParallelStrategy()) == "dcp"
    assert not _writes_dcp(ModelParallelStrategy(save_distributed_checkpoint=False))
    assert _writes_shards(FSDPStrategy(state_dict_type="sharded")) == "dcp"
    assert _writes_shards(FSDPStrategy(state_dict_type="full")) is None
    assert _writes_shards(DDPStrategy()) is None
