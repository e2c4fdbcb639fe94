"""Full disks, for real: a small tmpfs mounted for the test (root, or a user namespace where allowed).

A save that does not fit fails as one ckptmgr error (a CommitError naming the path), publishes nothing,
leaves no staging behind once the next writer opens the run, and never costs the previous checkpoint.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from ckptmgr import CheckpointManager, CkptMgrError, CommitError
from ckptmgr.catalog import resolve
from tests.conftest import tensor_state
from tests.helpers.trainer import run_trainer


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size, unmounted afterwards."""
    mounted = []

    def mount(size: str) -> str:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here to make a full disk ({proc.stderr.strip()}); needs root")
        mounted.append(path)
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: str) -> None:
    """Fill the filesystem of ``path`` to the last byte."""
    fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_save_that_does_not_fit_fails_cleanly_and_costs_nothing(small_disk):
    disk = small_disk("600k")
    run_dir = os.path.join(disk, "run")
    big = {"w": tensor_state(1)["weight"].repeat(8, 1)}  # ~128 KiB
    with CheckpointManager(run_dir, keep_last=None, last_alias=None) as manager:
        manager.save(big, step=1)
        with pytest.raises(CommitError, match="no space left") as info:
            for step in range(2, 10):
                manager.save(big, step=step)
        assert run_dir in str(info.value)
        newest = resolve(run_dir).step
    staging = os.path.join(run_dir, ".ckptmgr", "staging")
    assert not os.listdir(staging)  # the failed save removed its staging file
    with CheckpointManager(run_dir, keep_last=None, last_alias=None):
        pass
    assert resolve(run_dir).step == newest >= 1


def test_a_completely_full_disk_is_one_error_not_a_traceback(small_disk):
    disk = small_disk("256k")
    fill(disk)
    with pytest.raises(CkptMgrError, match="no space left"):
        CheckpointManager(os.path.join(disk, "run")).save(tensor_state(1), step=1)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_the_trainer_on_a_disk_that_fills_exits_with_one_line(async_save, small_disk):
    disk = small_disk("900k")  # room for a few saves of the tiny model (~230 KB each)
    extra = ["--async-save"] if async_save else []
    code, out, err = run_trainer(disk, "run", "--max-steps", "400", "--keep-last", "100", *extra)
    assert code == 6, err[-2000:]
    assert "Traceback" not in err and "training: error:" in err and "no space left" in err
    run_dir = os.path.join(disk, "runs", "run")
    found = resolve(run_dir)
    assert found is not None and found.step >= 50  # the saves that fitted are intact
    # The user frees some space (an old checkpoint); the next writer removes what the failed save left.
    oldest = min((c for c in CheckpointManager(run_dir).checkpoints() if c.status == "valid"), key=lambda c: c.step)
    os.unlink(oldest.path)
    with CheckpointManager(run_dir, keep_last=None, last_alias=None):
        pass
    assert not os.listdir(os.path.join(run_dir, ".ckptmgr", "staging"))
