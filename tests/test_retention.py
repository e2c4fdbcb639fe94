"""Retention: pure policies, and the manager never deleting what it must keep."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from ckptmgr import CheckpointManager, UsageError
from ckptmgr.manifest import FileEntry, Manifest
from ckptmgr.retention import KeepEpochEnds, KeepEveryNSteps, KeepLast, select_for_deletion
from ckptmgr.storage import LocalStorage
from tests.conftest import run_cli, tensor_state


def m(step: int, seq: int, epoch_end: bool = False) -> Manifest:
    return Manifest(name=f"step={step}.ckpt", step=step, epoch=0, sequence=seq, kind="torch", load_path=".",
                    files=(FileEntry(path="a", size=1, xxh3_128="0" * 32),), created_unix=0.0, epoch_end=epoch_end)


def newest_first(*manifests: Manifest) -> list[Manifest]:
    return sorted(manifests, key=lambda x: (x.step, x.sequence), reverse=True)


def test_keep_last():
    ordered = newest_first(*(m(s, s) for s in range(1, 6)))
    doomed = select_for_deletion(ordered, [KeepLast(n=2)], just_committed=5)
    assert [d.step for d in doomed] == [1, 2, 3]


def test_keep_every_n_steps_and_epoch_ends_union():
    ordered = newest_first(m(100, 1), m(150, 2, epoch_end=True), m(200, 3), m(250, 4), m(300, 5))
    doomed = select_for_deletion(ordered, [KeepLast(n=1), KeepEveryNSteps(n=100), KeepEpochEnds(n=None)],
                                 just_committed=5)
    assert [d.step for d in doomed] == [250]


def test_keep_epoch_ends_bounded():
    ordered = newest_first(m(1, 1, True), m(2, 2, True), m(3, 3, True), m(4, 4))
    doomed = select_for_deletion(ordered, [KeepLast(n=1), KeepEpochEnds(n=1)], just_committed=4)
    assert [d.step for d in doomed] == [1, 2]


def test_never_deletes_anything_ordered_above_the_new_checkpoint():
    # A rollback: the run re-saves step 50 while step 90 (from before) still exists.
    ordered = newest_first(m(90, 3), m(50, 4), m(40, 2), m(10, 1))
    doomed = select_for_deletion(ordered, [KeepLast(n=1)], just_committed=4)
    assert 90 not in [d.step for d in doomed] and 50 not in [d.step for d in doomed]
    assert [d.step for d in doomed] == [10, 40]


def test_protected_sequences_are_kept():
    ordered = newest_first(*(m(s, s) for s in range(1, 5)))
    assert [d.step for d in select_for_deletion(ordered, [KeepLast(n=1)], just_committed=4, protected={2})] == [1, 3]


@pytest.mark.parametrize("kwargs", [{"keep_last": 0}, {"keep_every_n_steps": 0}, {"keep_epochs": -1},
                                    {"durability_timeout_s": 0}])
def test_invalid_options_raise(tmp_path, kwargs):
    with pytest.raises(UsageError):
        CheckpointManager(tmp_path, **kwargs)


def test_manager_rotation_keeps_last_and_epoch_ends(run_dir):
    with CheckpointManager(run_dir, keep_last=2, keep_every_n_steps=40) as manager:
        for step in range(10, 110, 10):
            manager.save(tensor_state(step), step=step, epoch=step // 50, epoch_end=step == 50)
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("epoch="))
    steps = sorted(int(n.split("step=")[1].split(".")[0]) for n in names)
    assert steps == [40, 50, 80, 90, 100]  # every 40, the epoch end (50), the last two
    # `last.ckpt` is the newest's bytes (a hard link), and retention left no trash behind.
    assert os.path.samefile(os.path.join(run_dir, "last.ckpt"), os.path.join(run_dir, "epoch=2-step=100.ckpt"))
    assert not os.listdir(os.path.join(run_dir, ".ckptmgr", "trash"))


def test_same_step_twice_gets_a_version_suffix(run_dir):
    with CheckpointManager(run_dir, keep_last=None) as manager:
        first = manager.save(tensor_state(1), step=5, epoch=0)
        second = manager.save(tensor_state(2), step=5, epoch=0)
    assert (first.name, second.name) == ("epoch=0-step=5.ckpt", "epoch=0-step=5-v1.ckpt")
    assert second.sequence == first.sequence + 1
    assert CheckpointManager(run_dir).resolve().name == "epoch=0-step=5-v1.ckpt"


def test_foreign_last_is_moved_aside_never_deleted(run_dir):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "last.ckpt"), "wb") as f:
        f.write(b"user data")
    with CheckpointManager(run_dir) as manager:
        manager.save(tensor_state(1), step=1)
    aside = [n for n in os.listdir(run_dir) if n.startswith("last.ckpt.displaced-")]
    assert len(aside) == 1
    with open(os.path.join(run_dir, aside[0]), "rb") as f:
        assert f.read() == b"user data"
    assert os.path.samefile(os.path.join(run_dir, "last.ckpt"), os.path.join(run_dir, "step=1.ckpt"))


class NoLinks(LocalStorage):
    """A filesystem (a FUSE layer, an object-store mount) that refuses hard links, symlinks, or both."""

    def __init__(self, *, hard: bool, soft: bool):
        self.hard, self.soft = hard, soft

    def link(self, src, dst):
        if not self.hard:
            raise OSError(errno.EPERM, "Operation not permitted", dst)
        super().link(src, dst)

    def symlink(self, target, path):
        if not self.soft:
            raise OSError(errno.EPERM, "Operation not permitted", path)
        super().symlink(target, path)


@pytest.mark.parametrize("hard, soft, expected", [(True, True, "hardlink"), (False, True, "full-copy"),
                                                  (False, False, "full-copy")])
def test_last_falls_back_to_what_the_filesystem_holds(hard, soft, expected, run_dir):
    with CheckpointManager(run_dir, storage=NoLinks(hard=hard, soft=soft)) as manager:
        manager.save(tensor_state(1), step=1)
        manager.save(tensor_state(2), step=2)
        # Lightning's save_last="link" style: a symlink where it can be made, else the copy style.
        link_kind = manager.point_last("step=1.ckpt", alias="link.ckpt", style="link")
    with open(os.path.join(run_dir, ".ckptmgr", "links.json")) as f:
        assert json.load(f) == {"hardlink": hard, "symlink": soft}  # probed once, remembered
    state = torch.load(os.path.join(run_dir, "last.ckpt"), weights_only=True)  # plain torch.load either way
    assert float(state["bias"][0]) == 2.0
    listing = json.loads(run_cli("list", run_dir, "--json").stdout)
    rows = {r["name"]: r for r in listing["checkpoints"]}
    assert (rows["last.ckpt"]["alias"], rows["last.ckpt"]["status"]) == (expected, "valid")  # list says which
    assert link_kind == ("symlink" if soft else expected)
    assert os.path.islink(os.path.join(run_dir, "link.ckpt")) == soft
