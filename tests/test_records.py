"""records: commit records are read one by one; a broken or unreadable one is kept with its problem."""

from __future__ import annotations

import os

from ckptmgr import CheckpointManager
from ckptmgr.naming import MANIFESTS_DIR, STAGING_DIR
from ckptmgr.records import newest_first, read_records
from tests.conftest import tensor_state


def test_records_of_a_run(run_dir):
    with CheckpointManager(run_dir, keep_last=None, last_alias=None) as manager:
        for step in (1, 2):
            manager.save(tensor_state(step), step=step)
    records = read_records(run_dir)
    assert sorted(r.manifest.name for r in records) == ["step=1.ckpt", "step=2.ckpt"]
    assert [r.manifest.step for r in newest_first(records)] == [2, 1]


def test_a_broken_record_is_kept_with_its_problem(run_dir):
    with CheckpointManager(run_dir, keep_last=None, last_alias=None) as manager:
        manager.save(tensor_state(1), step=1)
    (record,) = read_records(run_dir)
    with open(record.path, "r+b") as f:
        f.truncate(50)
    (broken,) = read_records(run_dir)
    assert broken.manifest is None and "not valid JSON" in broken.problem and broken.stem == "step=1.ckpt"


def test_a_record_whose_save_is_still_staged_is_pending(run_dir):
    with CheckpointManager(run_dir, keep_last=None, last_alias=None) as manager:
        manager.save(tensor_state(1), step=1)
    (record,) = read_records(run_dir)
    os.makedirs(os.path.join(run_dir, STAGING_DIR), exist_ok=True)
    open(os.path.join(run_dir, STAGING_DIR, record.filename[: -len(".json")]), "wb").close()
    assert read_records(run_dir) == []
    (pending,) = read_records(run_dir, include_pending=True)
    assert pending.pending


def test_no_records_area_is_no_records(tmp_path):
    assert read_records(str(tmp_path)) == []
    os.makedirs(tmp_path / "run" / ".ckptmgr")
    (tmp_path / "run" / MANIFESTS_DIR).write_text("a file where the directory belongs")
    assert read_records(str(tmp_path / "run")) == []


def test_an_empty_staging_directory_is_no_unpublished_save(run_dir):
    """Some Volumes leave an empty directory behind when one is renamed away: it is no payload."""
    with CheckpointManager(run_dir, keep_last=None, last_alias=None) as manager:
        with manager.stage(step=1) as staging, staging.open_file("a.bin") as f:
            f.write(b"x")
    (record,) = read_records(run_dir)
    os.makedirs(os.path.join(run_dir, STAGING_DIR, record.filename[: -len(".json")]))
    assert [r.manifest.step for r in read_records(run_dir)] == [1]
