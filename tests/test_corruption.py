"""Corruption-injection matrix: each kind of damage to the newest checkpoint.

For every case, resolve() returns the newest checkpoint that is really intact,
`ckptmgr verify` names the problem (exit 1) or passes (exit 0) as it should,
and readers modify nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from ckptmgr import CheckpointManager
from ckptmgr.catalog import resolve
from ckptmgr.manifest import MANIFEST_NAME
from tests.conftest import run_cli
from tests.test_manifest import resigned

NEWEST = "epoch=0-step=30.ckpt"


def payload(run_dir: str, name: str = NEWEST) -> str:
    return os.path.join(run_dir, name, "checkpoint.pt")


def flip(path: str, where: str) -> None:
    size = os.path.getsize(path)
    offset = {"start": 0, "middle": size // 2, "end": size - 1}[where]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def edit_manifest(run_dir: str, change, *, resign: bool) -> None:
    path = os.path.join(run_dir, NEWEST, MANIFEST_NAME)
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


def _extra(d):
    with open(os.path.join(d, NEWEST, "notes.txt"), "w") as f:
        f.write("hello")


def _manifest_json(d):
    with open(os.path.join(d, NEWEST, MANIFEST_NAME), "r+b") as f:
        f.truncate(100)


def _traversal(d):
    escape = "../epoch=0-step=20.ckpt/checkpoint.pt"
    edit_manifest(d, lambda b: b["files"].__setitem__(0, dict(b["files"][0], path=escape)), resign=True)


def _symlink(d):
    os.replace(payload(d), payload(d) + ".real")
    os.symlink("checkpoint.pt.real", payload(d))


def _stale_staging(d):
    shutil.copytree(os.path.join(d, NEWEST), os.path.join(d, ".ckptmgr-staging.epoch=0-step=99.ckpt.dead"))


def _half_deleted(d):
    trash = os.path.join(d, ".ckptmgr-trash.epoch=0-step=40.ckpt.dead")
    shutil.copytree(os.path.join(d, NEWEST), trash)
    os.unlink(os.path.join(trash, "checkpoint.pt"))


def _no_manifest(d):
    os.unlink(os.path.join(d, NEWEST, MANIFEST_NAME))


def _last_missing(d):
    os.unlink(os.path.join(d, "last.ckpt"))
    os.symlink("epoch=0-step=77.ckpt", os.path.join(d, "last.ckpt"))


def _last_corrupt(d):
    # last points at the newest, which is torn: the alias must not be trusted
    flip(payload(d), "middle")


# case -> (damage, expected resolve pick, verify exit code, text verify must print)
CASES = {
    "flip-start": (lambda d: flip(payload(d), "start"), "epoch=0-step=20.ckpt", 1, "xxh3_128 mismatch"),
    "flip-middle": (lambda d: flip(payload(d), "middle"), "epoch=0-step=20.ckpt", 1, "xxh3_128 mismatch"),
    "flip-end": (lambda d: flip(payload(d), "end"), "epoch=0-step=20.ckpt", 1, "xxh3_128 mismatch"),
    "truncated": (_truncate, "epoch=0-step=20.ckpt", 1, "size"),
    "zero-length": (_zero, "epoch=0-step=20.ckpt", 1, "size 0"),
    "deleted-file": (lambda d: os.unlink(payload(d)), "epoch=0-step=20.ckpt", 1, "checkpoint.pt: missing"),
    "extra-file": (_extra, NEWEST, 0, "notes.txt: not listed"),
    "manifest-json": (_manifest_json, "epoch=0-step=20.ckpt", 1, "not valid JSON"),
    "manifest-hash": (lambda d: edit_manifest(d, lambda b: b.update(step=31), resign=False), "epoch=0-step=20.ckpt", 1,
                      "self-hash mismatch"),
    "manifest-traversal": (_traversal, "epoch=0-step=20.ckpt", 1, "escapes"),
    "symlinked-payload": (_symlink, "epoch=0-step=20.ckpt", 1, "symlink"),
    "manifest-missing": (_no_manifest, "epoch=0-step=20.ckpt", 1, "incomplete"),
    "stale-staging": (_stale_staging, NEWEST, 0, "3 checked, 0 invalid"),
    "half-deleted": (_half_deleted, NEWEST, 0, "3 checked, 0 invalid"),
    "last-missing-step": (_last_missing, NEWEST, 0, "3 checked, 0 invalid"),
    "last-points-at-corrupt": (_last_corrupt, "epoch=0-step=20.ckpt", 1, "xxh3_128 mismatch"),
}


def snapshot(root: str) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = None
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    digest = hashlib.md5(f.read()).hexdigest()
            state[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_matrix(case, make_run, run_dir, caplog):
    damage, expected, verify_code, text = CASES[case]
    make_run()
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
    assert proc.stdout.strip().startswith(os.path.join(run_dir, expected))
    run_cli("list", run_dir)
    assert snapshot(run_dir) == before, "a reader modified the run directory"

    # A writer resuming quarantines what it skipped, and loads the intact one.
    with CheckpointManager(run_dir) as manager:
        state = manager.load()
    assert float(state["bias"][0]) == int(expected.split("step=")[1].split(".")[0])
    if expected != NEWEST and case != "manifest-missing":
        assert not os.path.exists(os.path.join(run_dir, NEWEST))
        quarantined = os.listdir(os.path.join(run_dir, ".ckptmgr", "quarantine"))
        assert [q.startswith(NEWEST) for q in quarantined] == [True]


def test_every_candidate_corrupt_is_a_clear_error_not_a_fresh_start(make_run, run_dir):
    from ckptmgr import NoValidCheckpointError

    make_run(steps=(1, 2))
    for name in ("epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"):
        flip(payload(run_dir, name), "middle")
    assert resolve(run_dir) is None
    manager = CheckpointManager(run_dir)
    with pytest.raises(NoValidCheckpointError, match="2 candidate"):
        manager.resolve(strict=True)
    with pytest.raises(NoValidCheckpointError):
        manager.load()
    proc = run_cli("resolve", run_dir)
    assert proc.returncode == 1 and "no valid checkpoint" in proc.stderr
