"""Crash consistency: real SIGKILLs of a saving process, and a crash at every failpoint.

Every kind of save is swept (tests/helpers/crashlib.py, MODES): a single-file checkpoint, a
directory checkpoint, and both saved over an existing name; each save also moves the `last`
alias and runs retention. Invariant checked after every crash (crashlib.check_invariants):
resolve returns a verified checkpoint at least as new as the last acknowledged save, holding
that step's data; nothing published is torn; the next writer rolls back or removes every
leftover. Set CKPTMGR_SOAK=N to run N random-time kills per mode instead of the CI-sized count.
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
from tests.helpers.crashlib import check_invariants, holds_its_step, save_step

WORKER = os.path.join(REPO, "tests", "helpers", "save_worker.py")
RANDOM_KILLS = int(os.environ.get("CKPTMGR_SOAK", "40"))
SWEPT = ["file", "directory", "replace-file", "replace-directory"]


def worker(run_dir: str, mode: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, run_dir, mode, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))


def acked(output: str) -> int | None:
    steps = [int(line.split()[1]) for line in output.splitlines() if line.startswith("ack ")]
    return max(steps) if steps else None


def seeded_run(path: str, mode: str, steps=(1, 2, 3)) -> str:
    with CheckpointManager(path, keep_last=2) as manager:
        for step in steps:
            save_step(manager, step, mode)
    return path


def count_failpoints(template: str, mode: str, tmp_path) -> list[tuple[str, str]]:
    run_dir = str(tmp_path / f"dry-{mode}")
    shutil.copytree(template, run_dir, symlinks=True)
    storage = FaultyStorage()
    with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
        save_step(manager, 4, mode)
    return storage.ops


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("templates")
    return {mode: seeded_run(str(root / mode), mode) for mode in SWEPT}


@pytest.mark.parametrize("mode", ["raw-file", "directory"])
def test_random_time_sigkills(mode, tmp_path):
    rng = random.Random(1234)
    run_dir = str(tmp_path / "run")
    last_acked: int | None = None
    next_step = 1
    for _trial in range(RANDOM_KILLS):
        proc = worker(run_dir, mode, "loop", str(next_step))
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
        next_step = max((resolved or 0) + 1, (last_acked or 0) + 1)
    # the kills did hit during real progress
    assert last_acked is not None and last_acked > RANDOM_KILLS // 4, last_acked


@pytest.mark.parametrize("mode", SWEPT)
def test_every_failpoint_has_been_enumerated(mode, templates, tmp_path):
    ops = {op for op, _ in count_failpoints(templates[mode], mode, tmp_path)}
    # save (staging, writes, fsyncs, the record, the rename), `last` (a hard link and its record), retention
    expected = {"makedirs", "open_write", "write", "fsync", "sync_dir", "rename", "link", "remove_tree", "unlink"}
    if mode.startswith("replace"):
        expected -= {"remove_tree"}  # nothing to retire: one name, saved over
        expected |= {"replace"} if mode == "replace-file" else {"mkdir"}
    assert expected <= ops, expected - ops


@pytest.mark.parametrize("mode", SWEPT)
@pytest.mark.parametrize("action", ["raise", "kill"])
def test_crash_at_every_failpoint(action, mode, templates, tmp_path):
    total = len(count_failpoints(templates[mode], mode, tmp_path))
    assert total > 15
    points = range(1, total + 1) if action == "raise" or mode in ("file", "replace-directory") else \
        range(1, total + 1, 3)  # SIGKILL costs a process start: every point for two modes, a third for the rest
    for at in points:
        run_dir = str(tmp_path / f"{action}-{at}")
        shutil.copytree(templates[mode], run_dir, symlinks=True)
        if action == "raise":
            storage = FaultyStorage(Fault(at=at, action="raise"))
            done = None
            with pytest.raises(InjectedCrash):
                with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
                    save_step(manager, 4, mode)
                    done = 4
            assert done is None
            last_acked = 3
        else:
            proc = worker(run_dir, mode, "fault", "kill", str(at), "4")
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL
            last_acked = acked(out) or 3
        check_invariants(run_dir, last_acked)


@pytest.mark.parametrize("mode", SWEPT)
@pytest.mark.parametrize("seed", range(3))
def test_power_loss_at_every_failpoint(seed, mode, templates, tmp_path):
    """Crash, then lose what was not synced: torn files, undone renames and replacements, undone unlinks."""
    rng = random.Random(seed)
    total = len(count_failpoints(templates[mode], mode, tmp_path))
    for at in range(1, total + 1):
        run_dir = str(tmp_path / f"pl-{at}")
        shutil.copytree(templates[mode], run_dir, symlinks=True)
        storage = FaultyStorage(Fault(at=at, action="raise"))
        with pytest.raises(InjectedCrash):
            with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
                save_step(manager, 4, mode)
        storage.lose_unsynced(rng)
        check_invariants(run_dir, 3)


@pytest.mark.parametrize("mode", SWEPT)
def test_power_loss_after_acknowledgement_keeps_the_save(mode, templates, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(templates[mode], run_dir, symlinks=True)
    storage = FaultyStorage()
    with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
        save_step(manager, 4, mode)
    for seed in range(20):
        storage.lose_unsynced(random.Random(seed))
    assert check_invariants(run_dir, 4) == 4


@pytest.mark.parametrize("mode", ["raw-file", "directory"])
def test_reader_during_writes_sees_only_committed(mode, tmp_path):
    """resolve() racing a live writer (saves, `last`, retention) only ever returns committed data."""
    from ckptmgr.catalog import resolve

    run_dir = str(tmp_path / "run")
    proc = worker(run_dir, mode, "loop", "1")
    try:
        assert proc.stdout.readline().startswith("ack ")
        seen = []
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            found = resolve(run_dir)
            assert found is not None
            try:
                assert holds_its_step(found.path, found.step)
            except FileNotFoundError:
                continue  # rotated away after we resolved it: fine, it was valid then
            seen.append(found.step)
        assert len(seen) > 20 and seen == sorted(seen) and seen[-1] > seen[0]
    finally:
        proc.kill()
        proc.communicate()
