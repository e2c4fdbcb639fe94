"""Legacy checkpoints: torch zip CRC32 checks (never unpickling) and `ckptmgr seal`."""

from __future__ import annotations

import os
import random

import pytest
import torch

from ckptmgr import CheckpointManager, InvalidCheckpointError, UsageError
from ckptmgr.testing import Fault, FaultyStorage, InjectedCrash
from ckptmgr.verify import Status, verify_checkpoint
from tests.conftest import run_cli
from tests.helpers.files import deepspeed_dir, flip_inside_record, snapshot, torch_file


def test_legacy_file_crc_ok_and_flipped(tmp_path):
    path = torch_file(str(tmp_path / "run" / "epoch=0-step=7.ckpt"))
    assert verify_checkpoint(path).status is Status.LEGACY_OK
    flip_inside_record(path)
    result = verify_checkpoint(path)
    assert result.status is Status.LEGACY_CORRUPT and "CRC32 mismatch" in result.reason
    # torch.load itself does not notice:
    torch.load(path, weights_only=True)


def test_legacy_truncated_file(tmp_path):
    path = torch_file(str(tmp_path / "last.ckpt"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    assert verify_checkpoint(path).status is Status.LEGACY_CORRUPT
    proc = run_cli("verify", path)
    assert proc.returncode == 1 and "zip structure broken" in proc.stdout


def test_legacy_deepspeed_dir_crc(tmp_path):
    path = deepspeed_dir(str(tmp_path / "last.ckpt"))
    assert verify_checkpoint(path).status is Status.LEGACY_OK
    flip_inside_record(os.path.join(path, "checkpoint", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    result = verify_checkpoint(path)
    assert result.status is Status.LEGACY_CORRUPT and "optim_states" in result.reason


def test_seal_file_becomes_a_managed_checkpoint_in_place(tmp_path):
    path = torch_file(str(tmp_path / "run" / "epoch=2-step=40.ckpt"), step=40)
    with open(path, "rb") as f:
        original = f.read()
    proc = run_cli("seal", path, "--json")
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(path)  # sealing moves no byte: the commit record is written beside, in .ckptmgr/
    with open(path, "rb") as f:
        assert f.read() == original
    found = CheckpointManager(str(tmp_path / "run")).resolve()
    assert (found.step, found.epoch, found.name, found.load_path) == (40, 2, "epoch=2-step=40.ckpt", path)
    assert torch.load(found.load_path, weights_only=True)["global_step"] == 40
    assert verify_checkpoint(path).status is Status.VALID


def test_seal_deepspeed_dir_in_place(tmp_path):
    path = deepspeed_dir(str(tmp_path / "run" / "step=100.ckpt"))
    proc = run_cli("seal", path)
    assert proc.returncode == 0, proc.stderr
    found = CheckpointManager(str(tmp_path / "run")).resolve()
    assert found.manifest.kind == "deepspeed" and found.load_path == path
    assert {f.path for f in found.manifest.files} == {
        "latest", "checkpoint/mp_rank_00_model_states.pt", "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt"}


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(os.path.join(p, "latest"), "w").write("global_step9"), "names tag 'global_step9'"),
    (lambda p: os.unlink(os.path.join(p, "checkpoint", "mp_rank_00_model_states.pt")), "no model states file"),
])
def test_a_deepspeed_dir_that_can_never_load_is_refused(damage, message, tmp_path):
    path = deepspeed_dir(str(tmp_path / "run" / "step=100.ckpt"))
    damage(path)
    assert verify_checkpoint(path).status is Status.LEGACY_CORRUPT
    proc = run_cli("seal", path)
    assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert CheckpointManager(str(tmp_path / "run")).resolve() is None


def test_seal_refuses_a_symlink_and_a_run_directory_without_leaving_anything(tmp_path):
    run = tmp_path / "run"
    torch_file(str(run / "step=3.ckpt"))
    os.symlink("step=3.ckpt", run / "last.ckpt")
    before = snapshot(str(tmp_path))
    proc = run_cli("seal", str(run / "last.ckpt"))
    assert proc.returncode == 2 and "symlink" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("seal", str(run))
    assert proc.returncode == 2 and "this is a run directory" in proc.stderr
    os.makedirs(tmp_path / "empty")
    before["empty"] = snapshot(str(tmp_path))["empty"]
    proc = run_cli("seal", str(tmp_path / "empty"))
    assert proc.returncode == 3 and "empty directory" in proc.stderr
    assert snapshot(str(tmp_path)) == before


@pytest.mark.parametrize("kind", ["file", "deepspeed"])
def test_crash_at_every_failpoint_of_a_seal(kind, tmp_path):
    """Commit-marker mode under the crash sweep: the checkpoint is legacy (untouched) or sealed, never lost."""
    from ckptmgr.sealing import seal

    def make(where: str) -> str:
        name = "epoch=1-step=40.ckpt"
        return torch_file(os.path.join(where, name), step=40) if kind == "file" else \
            deepspeed_dir(os.path.join(where, name))

    dry = FaultyStorage()
    path = make(str(tmp_path / "dry"))
    seal(path, manager=CheckpointManager(os.path.dirname(path), keep_last=None, last_alias=None, storage=dry))
    for at in range(1, len(dry.ops) + 1):
        for power_loss in (False, True):
            where = str(tmp_path / f"{at}-{power_loss}")
            path = make(where)
            before = snapshot(path) if os.path.isdir(path) else open(path, "rb").read()
            storage = FaultyStorage(Fault(at=at, action="raise"))
            manager = CheckpointManager(where, keep_last=None, last_alias=None, storage=storage)
            with pytest.raises(InjectedCrash):
                seal(path, manager=manager)
            manager.close()
            if power_loss:
                storage.lose_unsynced(random.Random(at))
            after = snapshot(path) if os.path.isdir(path) else open(path, "rb").read()
            assert after == before, "sealing modified the checkpoint"
            status = verify_checkpoint(path).status
            assert status in (Status.VALID, Status.LEGACY_OK), (at, status)
            with CheckpointManager(where, keep_last=None, last_alias=None):
                pass  # the next writer recovers
            if verify_checkpoint(path).status is Status.LEGACY_OK:
                assert seal(path).step == 40  # an interrupted seal can simply be run again
            assert verify_checkpoint(path).status is Status.VALID


def test_seal_refuses_corrupt_and_leaves_it_untouched(tmp_path):
    path = torch_file(str(tmp_path / "run" / "step=3.ckpt"))
    flip_inside_record(path)
    with open(path, "rb") as f:
        before = f.read()
    proc = run_cli("seal", path)
    assert proc.returncode == 1 and "refusing to seal a corrupt checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    with open(path, "rb") as f:
        assert f.read() == before


def test_seal_needs_a_step(tmp_path):
    path = torch_file(str(tmp_path / "run" / "last.ckpt"))
    proc = run_cli("seal", path)
    assert proc.returncode == 2 and "--step" in proc.stderr
    assert os.path.isfile(path)
    proc = run_cli("seal", path, "--step", "9")
    assert proc.returncode == 0
    assert CheckpointManager(str(tmp_path / "run")).resolve().step == 9


def test_seal_twice_is_a_usage_error(tmp_path):
    path = torch_file(str(tmp_path / "run" / "step=3.ckpt"))
    from ckptmgr.sealing import seal

    seal(path)
    with pytest.raises(UsageError, match="already a managed checkpoint"):
        seal(path)


def test_seal_refuses_old_pickle_format_unless_allowed(tmp_path):
    path = str(tmp_path / "run" / "step=4.pt")
    os.makedirs(os.path.dirname(path))
    torch.save({"a": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    from ckptmgr.sealing import seal

    with pytest.raises(InvalidCheckpointError, match="allow-unchecked"):
        seal(path)
    assert seal(path, allow_unchecked=True).step == 4


def test_export_single_file_lightning_checkpoint(tmp_path):
    from safetensors.torch import load_file

    path = str(tmp_path / "epoch=0-step=9.ckpt")
    state = {"model.weight": torch.randn(3, 4), "model.bias": torch.zeros(3), "step_count": torch.tensor(9)}
    torch.save({"state_dict": state, "global_step": 9, "epoch": 0}, path)
    proc = run_cli("export", path, "-o", str(tmp_path / "out"), "--strip-prefix", "model.", "--json")
    assert proc.returncode == 0, proc.stderr
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == {"weight", "bias", "step_count"}
    assert torch.equal(out["weight"], state["model.weight"]) and out["step_count"].dtype == torch.int64


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_export_refuses_to_unpickle_arbitrary_objects(tmp_path):
    path = str(tmp_path / "step=1.ckpt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": Evil()}, path)
    proc = run_cli("export", path, "-o", str(tmp_path / "out"))
    assert proc.returncode == 1 and "refusing to unpickle" in proc.stderr and "pwned" not in proc.stdout
    assert not os.path.exists(tmp_path / "out")


def test_payload_saved_without_torch_crc32_is_unchecked_not_corrupt(tmp_path):
    """Managed saves skip torch's CRC32 (xxh3_128 covers every byte); a payload copied out is not 'corrupt'."""
    checkpoint = CheckpointManager(str(tmp_path / "run")).save({"w": torch.randn(100)}, step=1)
    assert torch.serialization.get_crc32_options() is True  # the process-wide setting was restored
    import shutil

    bare = str(tmp_path / "copied.pt")
    shutil.copyfile(checkpoint.load_path, bare)
    result = verify_checkpoint(bare)
    assert result.status is Status.LEGACY_UNCHECKED
    proc = run_cli("verify", bare)  # out of its run directory there is no record: it says so
    assert proc.returncode == 0 and "no commit record beside it" in proc.stdout
    assert verify_checkpoint(checkpoint.path).status is Status.VALID  # in its run directory: the record is found
    with_crc = CheckpointManager(str(tmp_path / "crc"), torch_crc32=True).save({"w": torch.randn(100)}, step=1)
    shutil.copyfile(with_crc.load_path, bare)
    assert verify_checkpoint(bare).status is Status.LEGACY_OK  # with torch's CRC32s kept, a copy checks out
