"""Crash consistency: real SIGKILLs of a saving process, and a crash at every failpoint.

Invariant checked after every crash (tests/helpers/crashlib.py): resolve returns a
verified checkpoint at least as new as the last acknowledged save, holding that
step's data; nothing published is torn; the next writer cleans up every leftover.
Set CKPTMGR_SOAK=N to run N random-time kills instead of the CI-sized count.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ckptmgr import CheckpointManager
from ckptmgr.testing import Fault, FaultyStorage, InjectedCrash
from tests.conftest import REPO
from tests.helpers.crashlib import check_invariants, payload_for, save_step

WORKER = os.path.join(REPO, "tests", "helpers", "save_worker.py")
RANDOM_KILLS = int(os.environ.get("CKPTMGR_SOAK", "120"))


def worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=REPO))


def acked(output: str) -> int | None:
    steps = [int(line.split()[1]) for line in output.splitlines() if line.startswith("ack ")]
    return max(steps) if steps else None


def seeded_run(path: str, steps=(1, 2, 3)) -> str:
    with CheckpointManager(path, keep_last=2) as manager:
        for step in steps:
            save_step(manager, step)
    return path


def count_failpoints(template: str, tmp_path) -> list[tuple[str, str]]:
    run_dir = str(tmp_path / "dry")
    shutil.copytree(template, run_dir, symlinks=True)
    storage = FaultyStorage()
    with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
        save_step(manager, 4)
    return storage.ops


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    return seeded_run(str(tmp_path_factory.mktemp("template") / "run"))


def test_random_time_sigkills(tmp_path):
    rng = random.Random(1234)
    run_dir = str(tmp_path / "run")
    last_acked: int | None = None
    next_step = 1
    for _trial in range(RANDOM_KILLS):
        proc = worker(run_dir, "loop", str(next_step))
        # Let it reach a random point: after 0-2 acknowledged saves, plus 0-30 ms.
        # Lines read here are acknowledgements too: keep them with the rest.
        seen = []
        for _ in range(rng.randrange(3)):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
        time.sleep(rng.random() * 0.03)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err
        trial_acked = acked("".join(seen) + (out or ""))
        if trial_acked is not None:
            last_acked = trial_acked
        resolved = check_invariants(run_dir, last_acked)
        next_step = (resolved or 0) + 1 if resolved is not None else 1
        next_step = max(next_step, (last_acked or 0) + 1)
    # the kills did hit during real progress
    assert last_acked is not None and last_acked > RANDOM_KILLS // 4, last_acked


def test_every_failpoint_has_been_enumerated(template, tmp_path):
    ops = {op for op, _ in count_failpoints(template, tmp_path)}
    # save (mkdir, write, fsync, sync_file, sync_dir, rename), last update (symlink, replace), retention (remove_tree)
    assert {"mkdir", "open_write", "write", "fsync", "sync_file", "sync_dir", "rename", "symlink", "replace",
            "remove_tree", "makedirs"} <= ops


@pytest.mark.parametrize("action", ["raise", "kill"])
def test_crash_at_every_failpoint(action, template, tmp_path):
    total = len(count_failpoints(template, tmp_path))
    assert total > 20
    for at in range(1, total + 1):
        run_dir = str(tmp_path / f"{action}-{at}")
        shutil.copytree(template, run_dir, symlinks=True)
        if action == "raise":
            storage = FaultyStorage(Fault(at=at, action="raise"))
            done = None
            with pytest.raises(InjectedCrash):
                with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
                    save_step(manager, 4)
                    done = 4
            assert done is None
            last_acked = 3
        else:
            proc = worker(run_dir, "fault", "kill", str(at), "4")
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL
            last_acked = acked(out) or 3
        check_invariants(run_dir, last_acked)


@pytest.mark.parametrize("seed", range(3))
def test_power_loss_at_every_failpoint(seed, template, tmp_path):
    """Crash, then lose what was not synced: torn files, undone renames."""
    rng = random.Random(seed)
    total = len(count_failpoints(template, tmp_path))
    for at in range(1, total + 1):
        run_dir = str(tmp_path / f"pl-{at}")
        shutil.copytree(template, run_dir, symlinks=True)
        storage = FaultyStorage(Fault(at=at, action="raise"))
        with pytest.raises(InjectedCrash):
            with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
                save_step(manager, 4)
        storage.lose_unsynced(rng)
        check_invariants(run_dir, 3)


def test_power_loss_after_acknowledgement_keeps_the_save(template, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(template, run_dir, symlinks=True)
    storage = FaultyStorage()
    with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
        save_step(manager, 4)
    for seed in range(20):
        storage.lose_unsynced(random.Random(seed))
    assert check_invariants(run_dir, 4) == 4


def test_reader_during_writes_sees_only_committed(tmp_path):
    """resolve() racing a live writer (saves + retention) only ever returns committed data."""
    from ckptmgr.catalog import resolve

    run_dir = str(tmp_path / "run")
    proc = worker(run_dir, "loop", "1")
    try:
        assert proc.stdout.readline().startswith("ack ")
        seen = []
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            found = resolve(run_dir)
            assert found is not None
            try:
                with open(os.path.join(found.path, "model.bin"), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue  # rotated away after we resolved it: fine, it was valid then
            assert data == payload_for(found.step)
            seen.append(found.step)
        assert len(seen) > 20 and seen == sorted(seen) and seen[-1] > seen[0]
    finally:
        proc.kill()
        proc.communicate()
