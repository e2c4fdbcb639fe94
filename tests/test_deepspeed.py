"""DeepSpeed ZeRO-2/3 with real engines on CPU (torchrun, gloo), managed; and `ckptmgr export`.

Lightning's DeepSpeedStrategy refuses CPU; these engines write Lightning's own
directory layout (``X.ckpt/latest``, ``X.ckpt/checkpoint/*.pt``), which is also
what ManagedCheckpoint stages for DeepSpeedStrategy on GPUs (docs/GPU.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import xxhash

from ckptmgr import CheckpointManager, ConfigMismatchError
from ckptmgr.catalog import resolve
from ckptmgr.verify import Status, list_tree, verify_checkpoint
from tests.conftest import REPO, run_cli
from tests.helpers.files import flip_inside_record

# One xdist worker runs them all, so each torchrun launch happens once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("deepspeed")

WORKER = os.path.join(REPO, "tests", "helpers", "ds_worker.py")
ENV = dict(os.environ, PYTHONPATH=REPO, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def ds_run(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"zero{request.param}"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           WORKER, str(request.param), out],
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    return request.param, out, report


def test_managed_zero_checkpoint_round_trip(ds_run):
    stage, out, report = ds_run
    assert report["params_equal"] and report["step"] == 6 and report["client_step"] == 6
    found = CheckpointManager(os.path.join(out, "run")).resolve()
    assert found.path == report["loaded"] and found.manifest.kind == "deepspeed"
    assert found.manifest.world_size == 2 and found.manifest.layout["zero_stage"] == stage
    files = {f.path for f in found.manifest.files}
    for rank in ("0", "1"):
        assert set(found.manifest.layout["shards"][rank]) <= files
    assert "latest" in files and os.path.isdir(os.path.join(found.path, "checkpoint"))  # Lightning's layout


def test_each_rank_hashes_its_shards_as_deepspeed_finishes_them(ds_run):
    stage, out, report = ds_run
    shards = expected_shards_of(stage)
    probe = os.path.join(out, "probe")
    everything = {}
    for rank, seen in enumerate(report["probe"]):
        # Every shard a rank writes went to the hasher when DeepSpeed finished it, not after the save.
        assert set(shards[str(rank)]) <= set(seen["as_written"]), (rank, seen["as_written"])
        assert seen["unwrapped"]  # the engine's own save() is back after the block
        for path, size, digest in seen["entries"]:
            everything[path] = (size, digest)
    files, _ = list_tree(probe)
    assert set(everything) == set(files)  # every file hashed by exactly the ranks' union, none forgotten
    for path, (size, digest) in everything.items():
        with open(os.path.join(probe, path), "rb") as f:
            data = f.read()
        assert (size, digest) == (len(data), xxhash.xxh3_128_hexdigest(data)), path  # files < one chunk


def test_a_rank_that_cannot_hash_fails_the_save_on_every_rank(ds_run):
    _, out, report = ds_run
    assert len(report["failed"]) == 2
    for outcome in report["failed"]:
        assert outcome.startswith("CommitError: ") and "DeepSpeed checkpoint not committed: rank 1:" in outcome
        assert "zero_pp_rank_1_mp_rank_00_" in outcome and "Input/output error" in outcome
    run_dir = os.path.join(out, "run")
    assert resolve(run_dir).step == 6
    assert not [name for name in os.listdir(run_dir) if "staging" in name]


def test_shard_hasher_hashes_the_last_write_and_only_inside_staging(tmp_path, monkeypatch):
    """DeepSpeed's own TorchCheckpointEngine, outside an engine: a file written twice, a file elsewhere."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from ckptmgr.deepspeed import ShardHasher

    staging, elsewhere = tmp_path / "staging", tmp_path / "elsewhere.pt"
    os.makedirs(staging / "checkpoint")
    writer = TorchCheckpointEngine()
    shard = str(staging / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with ShardHasher(SimpleNamespace(checkpoint_engine=writer), str(staging)) as hasher:
        writer.save({"v": torch.zeros(1000)}, shard)
        writer.save(state_dict={"v": torch.ones(1000)}, path=shard)  # DeepSpeed passes keywords too
        writer.save({"v": torch.ones(3)}, str(elsewhere))
    assert "save" not in vars(writer) and sorted(hasher.hashed_as_written) == [os.path.relpath(shard, staging)]
    [entry] = hasher.entries(0, 1)
    with open(shard, "rb") as f:
        assert entry.xxh3_128 == xxhash.xxh3_128_hexdigest(f.read())
    assert torch.equal(torch.load(shard)["v"], torch.ones(1000))


def expected_shards_of(stage: int) -> dict[str, list[str]]:
    from ckptmgr.deepspeed import expected_shards

    return expected_shards("checkpoint", 2, stage)


def copy_run(out: str, tmp_path) -> str:
    run_dir = str(tmp_path / "run")
    shutil.copytree(os.path.join(out, "run"), run_dir, symlinks=True)
    return run_dir


def test_missing_rank_shard_never_verifies(ds_run, tmp_path):
    _, out, _ = ds_run
    run_dir = copy_run(out, tmp_path)
    newest = os.path.join(run_dir, "step=6.ckpt")
    os.unlink(os.path.join(newest, "checkpoint", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    result = verify_checkpoint(newest)
    assert result.status is Status.CORRUPT and "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing" in result.reason
    # `last.ckpt` is a checkpoint of its own (a tree of hard links, its own record): step 6 survives through it.
    assert (resolve(run_dir).name, resolve(run_dir).step) == ("last.ckpt", 6)
    os.unlink(os.path.join(run_dir, "last.ckpt", "checkpoint", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    assert resolve(run_dir).name == "step=3.ckpt"


def test_flipped_byte_in_optimizer_shard(ds_run, tmp_path):
    _, out, _ = ds_run
    run_dir = copy_run(out, tmp_path)
    for name in ("step=6.ckpt", "last.ckpt"):  # copied apart by copy_run: damage both
        flip_inside_record(os.path.join(run_dir, name, "checkpoint", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    proc = run_cli("verify", run_dir)
    assert proc.returncode == 1 and "zero_pp_rank_0_mp_rank_00_optim_states.pt: xxh3_128 mismatch" in proc.stdout
    assert resolve(run_dir).name == "step=3.ckpt"
    proc = run_cli("export", os.path.join(run_dir, "step=6.ckpt"), "-o", str(tmp_path / "x"))
    assert proc.returncode == 1 and "refusing to export a corrupt checkpoint" in proc.stderr
    assert not os.path.exists(tmp_path / "x")


def test_commit_refuses_a_missing_shard(tmp_path):
    from ckptmgr import CommitError
    from ckptmgr.deepspeed import ShardHasher, expected_shards, gather_and_commit

    manager = CheckpointManager(str(tmp_path / "run"))
    layout = {"zero_stage": 2, "tag": "checkpoint", "shards": expected_shards("checkpoint", 2, 2)}
    handle = manager.begin(step=1, kind="deepspeed", world_size=2, layout=layout)
    os.makedirs(os.path.join(handle.path, "checkpoint"))
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):  # rank 1 wrote nothing
        with open(os.path.join(handle.path, "checkpoint", name), "wb") as f:
            f.write(b"x")
    with pytest.raises(CommitError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        gather_and_commit(manager, handle, handle.path, rank=0, world_size=1, layout=layout,
                          hasher=ShardHasher(None, handle.path))
    assert resolve(str(tmp_path / "run")) is None and not os.path.exists(handle.path)


def test_resume_under_another_world_size_is_refused_by_name(ds_run):
    from ckptmgr.deepspeed import check_world_size

    _, out, _ = ds_run
    found = CheckpointManager(os.path.join(out, "run")).resolve()
    with pytest.raises(ConfigMismatchError, match="written by 2 ranks; this run has 4"):
        check_world_size(found, 4)


@pytest.mark.parametrize("source", ["managed", "plain"])
def test_export_matches_deepspeed_bitwise(ds_run, source, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    stage, out, _ = ds_run
    src = os.path.join(out, "run", "step=6.ckpt") if source == "managed" else os.path.join(out, "plain")
    proc = run_cli("export", src, "-o", str(tmp_path / "model"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["source_kind"].endswith(f"ZeRO-{stage}")
    ours = load_file(str(tmp_path / "model" / "model.safetensors"))
    reference = get_fp32_state_dict_from_zero_checkpoint(src)
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        tensor = tensor.contiguous() if hasattr(tensor, "contiguous") else tensor
        assert torch.equal(ours[name], tensor), name
    assert summary["parameters"] == sum(t.numel() for t in ours.values())
    assert verify_checkpoint(str(tmp_path / "model")).status is Status.VALID  # the output has a manifest


def test_export_options_shards_dtype_prefix_and_bin(ds_run, tmp_path):
    from safetensors.torch import load_file

    _, out, _ = ds_run
    src = os.path.join(out, "run", "step=6.ckpt")
    assert run_cli("export", src, "-o", str(tmp_path / "full")).returncode == 0
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    proc = run_cli("export", src, "-o", str(tmp_path / "sharded"), "--max-shard-size", "2KB", "--dtype", "bf16",
                   "--strip-prefix", "0.")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "sharded" / "model.safetensors.index.json") as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    merged = {}
    for name in files:
        merged.update(load_file(str(tmp_path / "sharded" / name)))
    assert "weight" in merged and "0.weight" not in merged  # prefix "0." stripped
    for name, tensor in full.items():
        stripped = name[2:] if name.startswith("0.") else name
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert torch.equal(merged[stripped], expected), name
    proc = run_cli("export", src, "-o", str(tmp_path / "bin"), "--format", "bin")
    assert proc.returncode == 0, proc.stderr
    as_bin = torch.load(str(tmp_path / "bin" / "pytorch_model.bin"), weights_only=True)
    assert all(torch.equal(as_bin[k], full[k]) for k in full)
    assert os.path.getsize(tmp_path / "bin" / "pytorch_model.bin") < 4 * sum(t.nbytes for t in full.values()) + 8192


def test_export_refuses_existing_output_and_missing_source(ds_run, tmp_path):
    _, out, _ = ds_run
    (tmp_path / "exists").mkdir()
    proc = run_cli("export", os.path.join(out, "plain"), "-o", str(tmp_path / "exists"))
    assert proc.returncode == 2 and "never overwrites" in proc.stderr
    proc = run_cli("export", str(tmp_path / "nope"), "-o", str(tmp_path / "y"))
    assert proc.returncode == 2 and "no such" in proc.stderr
