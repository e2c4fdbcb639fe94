"""One writer per run directory: a second is refused by name, a dead one's lock is recovered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from ckptmgr import CheckpointManager, WriterLockedError
from tests.conftest import REPO, tensor_state

HOLDER = os.path.join(REPO, "tests", "helpers", "hold_lock.py")


def start_holder(run_dir: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, HOLDER, run_dir], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(run_dir):
    holder = start_holder(run_dir)
    try:
        manager = CheckpointManager(run_dir)
        with pytest.raises(WriterLockedError) as info:
            manager.save(tensor_state(1), step=1)
        text = str(info.value)
        assert f"pid {holder.pid}" in text and socket.gethostname() in text and run_dir in text
        assert not [n for n in os.listdir(run_dir) if not n.startswith(".ckptmgr")]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_writer_is_recovered(run_dir):
    holder = start_holder(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with CheckpointManager(run_dir) as manager:  # the kernel dropped the flock with the process
        manager.save(tensor_state(1), step=1)
    assert CheckpointManager(run_dir).resolve().step == 1


def test_readers_work_while_a_writer_holds_the_lock(run_dir, make_run):
    make_run(steps=(1,))
    holder = start_holder(run_dir)
    try:
        assert CheckpointManager(run_dir).resolve().step == 1
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_reentrant_within_one_manager_and_released_on_close(run_dir):
    manager = CheckpointManager(run_dir)
    with manager:
        manager.open()
        manager.save(tensor_state(1), step=1)
    assert not manager.holds_lock
    with CheckpointManager(run_dir) as other:
        other.save(tensor_state(2), step=2)
