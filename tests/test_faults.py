"""Disk errors and durability-hook failures: the save fails loudly, nothing rotates, training can go on."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from ckptmgr import CheckpointManager, CommitError
from ckptmgr.catalog import scan
from ckptmgr.naming import STAGING_DIR
from ckptmgr.testing import FailingHook, Fault, FaultyStorage
from tests.helpers.crashlib import check_invariants, save_step


@pytest.fixture
def seeded(tmp_path) -> str:
    run_dir = str(tmp_path / "run")
    with CheckpointManager(run_dir, keep_last=2) as manager:
        for step in (1, 2):
            save_step(manager, step)
    return run_dir


def names(run_dir: str) -> list[str]:
    return sorted(c.name for c in scan(run_dir))


def last_target(run_dir: str) -> str | None:
    """What `last.ckpt` is a copy of (its commit record says)."""
    (last,) = [c for c in scan(run_dir) if c.name == "last.ckpt"]
    return last.manifest.alias_of


# A single-file save makes no directory and syncs what it wrote through its own handle (no mkdir, no sync_file).
SAVE_OPS = [(mode, op) for mode in ("file", "directory")
            for op in ("mkdir", "makedirs", "open_write", "write", "fsync", "sync_file", "sync_dir", "rename")
            if mode == "directory" or op not in ("mkdir", "sync_file")]


@pytest.mark.parametrize("mode, op", SAVE_OPS)
@pytest.mark.parametrize("action", ["enospc", "eio"])
def test_disk_error_fails_the_save_loudly(op, action, mode, seeded):
    before = names(seeded)
    storage = FaultyStorage()
    manager = CheckpointManager(seeded, keep_last=1, storage=storage)
    with manager:
        storage.fault = Fault(at=1, action=action, op=op)  # counted from here: the save, not the writer's open
        with pytest.raises(CommitError) as info:
            save_step(manager, 3, mode)
        word = "no space left on the device" if action == "enospc" else "Input/output error"
        assert word in str(info.value) and seeded in str(info.value)
        # Nothing published, nothing rotated (keep_last=1 would otherwise have deleted), last unchanged.
        assert names(seeded) == before
        assert last_target(seeded) == "epoch=0-step=2.ckpt"
        # Training can go on: the next save (the fault fired once) succeeds.
        save_step(manager, 4, mode)
    check_invariants(seeded, 4)


def test_fsync_error_is_not_retried_as_success(seeded):
    storage = FaultyStorage(Fault(at=1, action="eio", op="fsync"))
    with CheckpointManager(seeded, storage=storage) as manager:
        with pytest.raises(CommitError):
            save_step(manager, 3)
    assert [op for op, _ in storage.ops].count("rename") == 0  # never published after the failed fsync
    assert CheckpointManager(seeded).resolve().step == 2


def test_failing_durability_hook_means_not_acknowledged(seeded):
    hook = FailingHook(error=RuntimeError("volume commit failed"))
    with CheckpointManager(seeded, keep_last=1, durability=hook) as manager:
        with pytest.raises(CommitError, match="volume commit failed.*not acknowledged"):
            save_step(manager, 3)
    assert len(hook.calls) == 1
    # Retention did not run (step 1 still there despite keep_last=1) and last did not move.
    assert "epoch=0-step=1.ckpt" in names(seeded)
    assert last_target(seeded) == "epoch=0-step=2.ckpt"


def test_hanging_durability_hook_times_out(seeded):
    hook = FailingHook(hang_s=5.0)
    start = time.monotonic()
    with CheckpointManager(seeded, keep_last=1, durability=hook, durability_timeout_s=0.3) as manager:
        with pytest.raises(CommitError, match="did not return within 0.3 s"):
            save_step(manager, 3)
    assert time.monotonic() - start < 4.0
    assert "epoch=0-step=1.ckpt" in names(seeded)


def test_exception_inside_stage_abandons_it(seeded):
    with CheckpointManager(seeded) as manager:
        with pytest.raises(KeyError):
            with manager.stage(step=3) as staging:
                with open(os.path.join(staging.path, "x"), "wb") as f:
                    f.write(b"partial")
                raise KeyError("user code failed mid-save")
    assert not os.listdir(os.path.join(seeded, STAGING_DIR))
    assert CheckpointManager(seeded).resolve().step == 2


def test_symlink_written_into_staging_is_refused(seeded):
    with CheckpointManager(seeded) as manager:
        with pytest.raises(CommitError, match="symlinks"):
            with manager.stage(step=3) as staging:
                os.symlink("/etc/passwd", os.path.join(staging.path, "evil"))
    assert CheckpointManager(seeded).resolve().step == 2


def test_bit_rot_after_commit_is_quarantined_never_deleted(seeded):
    victim = os.path.join(seeded, "epoch=0-step=2.ckpt")
    with open(os.path.join(victim, "model.bin"), "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    copy = str(seeded) + ".orig"
    shutil.copytree(victim, copy)
    with CheckpointManager(seeded) as manager:
        assert manager.resolve(quarantine=True).step == 1
    quarantine = os.path.join(seeded, ".ckptmgr", "quarantine")
    (moved,) = [n for n in os.listdir(quarantine) if n.startswith("epoch=0-step=2.ckpt")]  # and last.ckpt, its copy
    assert sorted(os.listdir(os.path.join(quarantine, moved)))[0] == "epoch=0-step=2.ckpt"  # with its records
    with open(os.path.join(quarantine, moved, "epoch=0-step=2.ckpt", "model.bin"), "rb") as a:
        with open(os.path.join(copy, "model.bin"), "rb") as b:
            assert a.read() == b.read()  # moved aside byte for byte
