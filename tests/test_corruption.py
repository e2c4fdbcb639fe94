"""Corruption-injection matrix: each kind of damage to the newest checkpoint.

For every case, resolve() returns the newest checkpoint that is really intact,
`ckptmgr verify` names the problem (exit 1) or passes (exit 0) as it should,
readers modify nothing, and a writer resuming quarantines what it skipped.
The run holds single-file checkpoints (format 3: the `.ckpt` file itself, its
commit record in `.ckptmgr/manifests/`); directory checkpoints and format-2
directories have matrices of their own below.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ckptmgr import CheckpointManager
from ckptmgr.catalog import resolve
from ckptmgr.naming import MANIFESTS_DIR, STAGING_DIR, TRASH_DIR
from ckptmgr.records import read_records
from tests.conftest import run_cli, tensor_state
from tests.helpers.files import flip, resigned, snapshot

NEWEST = "epoch=0-step=30.ckpt"
OLDER = "epoch=0-step=20.ckpt"


def payload(run_dir: str, name: str = NEWEST) -> str:
    return os.path.join(run_dir, name)


def record_of(run_dir: str, name: str = NEWEST) -> str:
    (record,) = [r.path for r in read_records(run_dir) if r.manifest is not None and r.manifest.name == name]
    return record


def edit_record(path: str, change, *, resign: bool) -> None:
    with open(path, "rb") as f:
        body = json.load(f)
    change(body)
    data = resigned(body) if resign else json.dumps(body).encode()
    with open(path, "wb") as f:
        f.write(data)


def _truncate(d):
    with open(payload(d), "r+b") as f:
        f.truncate(os.path.getsize(payload(d)) // 2)


def _zero(d):
    open(payload(d), "wb").close()


def _record_json(d):
    with open(record_of(d), "r+b") as f:
        f.truncate(100)


def _record_forged_for_another_file(d):
    """The record of step 20 re-signed under step 30's name: it describes other bytes than the file holds."""
    body = json.loads(open(record_of(d, OLDER), "rb").read())
    body.update(name=NEWEST, step=30, sequence=3, load_path=NEWEST, files=[dict(body["files"][0], path=NEWEST)])
    os.unlink(record_of(d))
    with open(os.path.join(d, MANIFESTS_DIR, f"{NEWEST}.0badc0de.json"), "wb") as f:
        f.write(resigned(body))


def _file_swapped(d):
    """Another checkpoint's bytes under the newest name (a manual copy): its own record does not match."""
    shutil.copyfile(payload(d, OLDER), payload(d))


def _symlink(d):
    os.replace(payload(d), payload(d) + ".real")
    os.symlink(NEWEST + ".real", payload(d))


def _stale_staging(d):
    """A crash after the record of step 40 was written, before its payload took its name."""
    os.makedirs(os.path.join(d, STAGING_DIR), exist_ok=True)
    shutil.copyfile(payload(d), os.path.join(d, STAGING_DIR, "epoch=0-step=40.ckpt.deadbeef"))
    edit_record(record_of(d), lambda b: b.update(name="epoch=0-step=40.ckpt", step=40, load_path="epoch=0-step=40.ckpt",
                                                 files=[dict(b["files"][0], path="epoch=0-step=40.ckpt")]),
                resign=True)
    os.replace(record_of(d, "epoch=0-step=40.ckpt"), os.path.join(d, MANIFESTS_DIR,
                                                                   "epoch=0-step=40.ckpt.deadbeef.json"))
    shutil.copyfile(os.path.join(d, MANIFESTS_DIR, "epoch=0-step=40.ckpt.deadbeef.json"),
                    os.path.join(d, MANIFESTS_DIR, f"{NEWEST}.aaaaaaaa.json"))
    edit_record(os.path.join(d, MANIFESTS_DIR, f"{NEWEST}.aaaaaaaa.json"),
                lambda b: b.update(name=NEWEST, step=30, load_path=NEWEST, files=[dict(b["files"][0], path=NEWEST)]),
                resign=True)


def _record_without_payload(d):
    """A newer record whose payload is gone (deleted by hand): skipped, never resolved."""
    src = record_of(d)
    dst = os.path.join(d, MANIFESTS_DIR, "epoch=0-step=40.ckpt.0000beef.json")
    shutil.copyfile(src, dst)
    edit_record(dst, lambda b: b.update(name="epoch=0-step=40.ckpt", step=40, sequence=9,
                                        load_path="epoch=0-step=40.ckpt",
                                        files=[dict(b["files"][0], path="epoch=0-step=40.ckpt")]), resign=True)


def _half_deleted(d):
    os.makedirs(os.path.join(d, TRASH_DIR), exist_ok=True)
    shutil.copyfile(payload(d), os.path.join(d, TRASH_DIR, "epoch=0-step=10.ckpt.deadbeef"))


def _last_corrupt(d):
    # `last` is a hard link of the newest: the same bytes, so it is torn too and must not be trusted
    flip(payload(d), "middle")


# case -> (damage, expected resolve pick, verify exit code, text verify must print, quarantined)
CASES = {
    "flip-start": (lambda d: flip(payload(d), "start"), OLDER, 1, "xxh3_128 mismatch", True),
    "flip-middle": (lambda d: flip(payload(d), "middle"), OLDER, 1, "xxh3_128 mismatch", True),
    "flip-end": (lambda d: flip(payload(d), "end"), OLDER, 1, "xxh3_128 mismatch", True),
    "truncated": (_truncate, OLDER, 1, "size", True),
    "zero-length": (_zero, OLDER, 1, "size 0", True),
    "deleted-file": (lambda d: os.unlink(payload(d)), OLDER, 1, "payload missing", True),
    "record-json": (_record_json, OLDER, 1, "not valid JSON", True),
    "record-hash": (lambda d: edit_record(record_of(d), lambda b: b.update(step=31), resign=False), OLDER, 1,
                    "self-hash mismatch", True),
    "record-deleted": (lambda d: os.unlink(record_of(d)), OLDER, 0, "legacy-unchecked", False),
    "record-forged": (_record_forged_for_another_file, OLDER, 1, "xxh3_128 mismatch", True),
    "file-swapped": (_file_swapped, OLDER, 1, "xxh3_128 mismatch", True),
    "symlinked-payload": (_symlink, OLDER, 1, "not a regular file", True),
    "stale-staging": (_stale_staging, NEWEST, 0, "3 checked, 0 invalid", False),
    "record-without-payload": (_record_without_payload, NEWEST, 1, "payload missing", False),
    "half-deleted": (_half_deleted, NEWEST, 0, "3 checked, 0 invalid", False),
    "last-points-at-corrupt": (_last_corrupt, OLDER, 1, "xxh3_128 mismatch", True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_matrix(case, make_run, run_dir, caplog):
    damage, expected, verify_code, text, quarantined = CASES[case]
    make_run(last_alias="last.ckpt" if case.startswith("last") else None)
    damage(run_dir)
    before = snapshot(run_dir)

    found = resolve(run_dir)
    assert found is not None and found.name == expected
    if expected != NEWEST:
        assert f"skipping {os.path.join(run_dir, NEWEST)}" in caplog.text  # the user reads why

    proc = run_cli("verify", run_dir)
    assert proc.returncode == verify_code, proc.stdout + proc.stderr
    assert text in proc.stdout
    proc = run_cli("resolve", run_dir)
    assert proc.stdout.strip() == os.path.join(run_dir, expected)
    run_cli("list", run_dir)
    run_cli("walk", run_dir)
    assert snapshot(run_dir) == before, "a reader modified the run directory"

    # A writer resuming quarantines what it skipped, and loads the intact one.
    with CheckpointManager(run_dir) as manager:
        state = manager.load()
    assert float(state["bias"][0]) == int(expected.split("step=")[1].split(".")[0])
    if quarantined:
        assert not os.path.exists(os.path.join(run_dir, NEWEST))
        entries = os.listdir(os.path.join(run_dir, ".ckptmgr", "quarantine"))
        assert sorted(q.split(".ckpt")[0] for q in entries) == sorted(
            ["epoch=0-step=30", "last"] if case.startswith("last") else ["epoch=0-step=30"])
    # What the writer found, it left in order: nothing of the crash remains.
    for area in (STAGING_DIR, TRASH_DIR):
        assert not os.path.isdir(os.path.join(run_dir, area)) or not os.listdir(os.path.join(run_dir, area))


@pytest.mark.parametrize("damage", ["record-deleted", "deleted-file"])
def test_the_last_copy_is_a_checkpoint_of_its_own(damage, make_run, run_dir):
    """`last.ckpt` is a hard link with its own commit record: losing the newest's record or its name
    leaves the same step resolvable through `last.ckpt`."""
    make_run()
    CASES[damage][0](run_dir)
    found = resolve(run_dir)
    assert (found.name, found.step) == ("last.ckpt", 30)


def test_every_candidate_corrupt_is_a_clear_error_not_a_fresh_start(make_run, run_dir):
    from ckptmgr import NoValidCheckpointError

    make_run(steps=(1, 2))
    for name in ("epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"):
        flip(payload(run_dir, name), "middle")
    assert resolve(run_dir) is None
    manager = CheckpointManager(run_dir)
    with pytest.raises(NoValidCheckpointError, match="3 candidate"):  # last.ckpt shares the newest's bytes
        manager.resolve(strict=True)
    with pytest.raises(NoValidCheckpointError):
        manager.load()
    proc = run_cli("resolve", run_dir)
    assert proc.returncode == 1 and "no valid checkpoint" in proc.stderr


# -- directory checkpoints (DeepSpeed's layout, or anything staged) ------------------------
def make_directory_run(run_dir: str) -> None:
    with CheckpointManager(run_dir, keep_last=None, last_alias=None) as manager:
        for step in (10, 20, 30):
            with manager.stage(step=step, epoch=0, kind="deepspeed") as staging:
                os.makedirs(os.path.join(staging.path, "checkpoint"))
                for rank in (0, 1):
                    with open(os.path.join(staging.path, "checkpoint", f"rank{rank}.pt"), "wb") as f:
                        f.write(bytes([step, rank]) * 5000)
                with staging.open_file("latest") as f:
                    f.write(b"checkpoint")


def _inside(d, rel="checkpoint/rank1.pt"):
    return os.path.join(d, NEWEST, rel)


DIRECTORY_CASES = {
    "flip-a-shard": (lambda d: flip(_inside(d), "middle"), OLDER, "checkpoint/rank1.pt: xxh3_128 mismatch"),
    "missing-shard": (lambda d: os.unlink(_inside(d)), OLDER, "checkpoint/rank1.pt: missing"),
    "symlink-inside": (lambda d: (os.unlink(_inside(d)), os.symlink("rank0.pt", _inside(d))), OLDER,
                       "symlink or special file"),
    "extra-file": (lambda d: open(_inside(d, "notes.txt"), "w").close(), NEWEST, "notes.txt: not listed"),
    "directory-deleted": (lambda d: shutil.rmtree(os.path.join(d, NEWEST)), OLDER, "payload missing"),
    "file-where-directory": (lambda d: (shutil.rmtree(os.path.join(d, NEWEST)),
                                        open(os.path.join(d, NEWEST), "w").close()), OLDER, "describes a directory"),
}


@pytest.mark.parametrize("case", sorted(DIRECTORY_CASES))
def test_directory_checkpoint_corruption(case, run_dir):
    damage, expected, text = DIRECTORY_CASES[case]
    make_directory_run(run_dir)
    damage(run_dir)
    found = resolve(run_dir)
    assert found is not None and found.name == expected
    proc = run_cli("verify", run_dir)
    assert text in proc.stdout, proc.stdout
    assert proc.returncode == (0 if expected == NEWEST else 1)


# -- format 2: directories with the manifest inside ---------------------------------------
def test_format2_corruption_is_caught_and_a_copied_manifest_is_refused(run_dir):
    from tests.helpers.format2 import write_format2_run

    write_format2_run(run_dir, steps=(10, 20, 30))
    assert resolve(run_dir).name == NEWEST
    flip(os.path.join(run_dir, NEWEST, "checkpoint.pt"), "middle")
    assert resolve(run_dir).name == OLDER
    # A manifest published under another name (the directory of step 20 holding step 10's) never verifies.
    shutil.rmtree(os.path.join(run_dir, OLDER))
    shutil.copytree(os.path.join(run_dir, "epoch=0-step=10.ckpt"), os.path.join(run_dir, OLDER))
    assert resolve(run_dir).name == "epoch=0-step=10.ckpt"
    proc = run_cli("verify", os.path.join(run_dir, OLDER))
    assert proc.returncode == 1 and "the manifest is that of 'epoch=0-step=10.ckpt'" in proc.stdout


def test_a_record_is_only_as_good_as_the_bytes_it_names(run_dir):
    """Tearing a checkpoint while its record stays intact is caught, also by --quick when the size changed."""
    with CheckpointManager(run_dir, keep_last=None) as manager:
        manager.save(tensor_state(1), step=1)
    name = "step=1.ckpt"
    with open(payload(run_dir, name), "ab") as f:
        f.write(b"x")
    assert run_cli("verify", "--quick", payload(run_dir, name)).returncode == 1
