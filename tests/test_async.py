"""Async saves and verify-while-loading."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from ckptmgr import CheckpointManager, CommitError, InvalidCheckpointError
from ckptmgr.async_save import AsyncCheckpointer, SnapshotBuffers
from ckptmgr.storage import LocalStorage
from ckptmgr.testing import FailingHook, Fault, FaultyStorage
from tests.conftest import tensor_state
from tests.helpers.files import flip


def test_snapshot_is_a_copy_and_buffers_are_reused():
    buffers = SnapshotBuffers(pin_memory=False)
    state = {"model": {"w": torch.ones(3)}, "opt": [torch.zeros(2), 5], "step": 7}
    first = buffers.snapshot(state)
    state["model"]["w"].add_(1)  # training goes on, in place
    assert torch.equal(first["model"]["w"], torch.ones(3)) and first["opt"][1] == 5 and first["step"] == 7
    pointer = first["model"]["w"].data_ptr()
    second = buffers.snapshot(state)
    assert second["model"]["w"].data_ptr() == pointer and torch.equal(second["model"]["w"], torch.full((3,), 2.0))


def test_async_saves_commit_in_order_and_match_sync(run_dir):
    with CheckpointManager(run_dir, keep_last=2) as manager, AsyncCheckpointer(manager) as saver:
        state = tensor_state(0)
        for step in range(1, 6):
            state["bias"].fill_(step)
            saver.save(state, step=step, epoch=0)
        last = saver.wait()
    assert last.step == 5
    loaded = CheckpointManager(run_dir).load()
    assert float(loaded["bias"][0]) == 5.0
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("epoch="))
    assert names == ["epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt"]


class GatedStorage(LocalStorage):
    """The first payload write waits for a gate: a save in flight that has snapshotted but not yet written."""

    def __init__(self, gate: threading.Event):
        self.gate = gate
        self.blocked = False

    def write_at(self, f, pieces, offset):
        if not self.blocked:
            self.blocked = True
            self.gate.wait(10)
        super().write_at(f, pieces, offset)


def test_at_most_one_save_in_flight(run_dir):
    """A second save waits for the first to commit: the snapshot buffers are reused, so a second snapshot
    taken while the first is still being written would write the second step's bytes into the first."""
    gate = threading.Event()
    big = {"w": torch.zeros(1 << 20)}  # over the writer's inline threshold: written by write_at
    with CheckpointManager(run_dir, keep_last=None, storage=GatedStorage(gate)) as manager:
        saver = AsyncCheckpointer(manager)
        saver.save(big, step=1)
        assert saver.busy
        big["w"].fill_(2.0)  # training goes on, in place
        threading.Timer(0.3, gate.set).start()
        started = time.monotonic()
        saver.save(big, step=2)  # must wait for step 1 to be written and committed
        assert time.monotonic() - started >= 0.25
        saver.close()
    first = CheckpointManager(run_dir).load(os.path.join(run_dir, "step=1.ckpt"))
    assert float(first["w"].max()) == 0.0, "step 1 holds step 2's bytes"
    assert float(CheckpointManager(run_dir).load()["w"][0]) == 2.0


def test_background_error_surfaces_at_the_next_call_and_blocks_deletions(run_dir):
    with CheckpointManager(run_dir, keep_last=1) as manager:
        manager.save(tensor_state(1), step=1)
    hook = FailingHook(error=RuntimeError("commit failed"))
    with CheckpointManager(run_dir, keep_last=1, durability=hook) as manager:
        saver = AsyncCheckpointer(manager)
        saver.save(tensor_state(2), step=2)
        deleted = saver.submit(lambda: manager._delete("step=1.ckpt"))
        deleted.result(timeout=30)
        with pytest.raises(CommitError, match="commit failed"):
            saver.check()
        saver.check()  # raised once, not forever
        saver.close()
    assert os.path.isfile(os.path.join(run_dir, "step=1.ckpt"))  # the deletion queued after the failure never ran


def test_disk_error_in_background_is_raised_by_wait(run_dir):
    storage = FaultyStorage(Fault(at=1, action="enospc", op="fsync"))
    with CheckpointManager(run_dir, storage=storage) as manager:
        saver = AsyncCheckpointer(manager)
        saver.save(tensor_state(1), step=1)
        with pytest.raises(CommitError, match="no space left"):
            saver.wait()
        saver.save(tensor_state(2), step=2)  # training goes on; the next save works
        assert saver.wait().step == 2
        saver.close()


def test_load_verifies_while_loading_and_falls_back(make_run, run_dir, caplog):
    make_run(steps=(10, 20, 30))
    flip(os.path.join(run_dir, "epoch=0-step=30.ckpt"), "middle")
    with CheckpointManager(run_dir) as manager:
        state = manager.load()
    assert float(state["bias"][0]) == 20.0
    assert "skipping" in caplog.text and "xxh3_128 mismatch" in caplog.text
    assert os.listdir(os.path.join(run_dir, ".ckptmgr", "quarantine"))  # the writer moved it aside


def test_load_of_a_given_corrupt_checkpoint_raises(make_run, run_dir):
    make_run(steps=(10,))
    checkpoint = CheckpointManager(run_dir).resolve()
    flip(checkpoint.load_path, "end")
    with pytest.raises(InvalidCheckpointError, match="xxh3_128 mismatch"):
        CheckpointManager(run_dir).load(checkpoint)
