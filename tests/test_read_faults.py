"""Read-side faults: a read that fails (EIO, ESTALE, EACCES) skips that candidate, never the whole resolve.

Faults are injected through the read seam (`ckptmgr.testing.FaultyReader`), on commit records and on
payload reads, for single-file and directory checkpoints. Set CKPTMGR_READ_SOAK=N for N random trials.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

from ckptmgr import CheckpointManager, NoValidCheckpointError
from ckptmgr.catalog import resolve
from ckptmgr.testing import FaultyReader
from tests.conftest import tensor_state

ERRNOS = {"EIO": errno.EIO, "ESTALE": errno.ESTALE, "EACCES": errno.EACCES}
NEWEST, OLDER = "epoch=0-step=30.ckpt", "epoch=0-step=20.ckpt"
READ_TRIALS = int(os.environ.get("CKPTMGR_READ_SOAK", "40"))


@pytest.mark.parametrize("what", ["manifest", "payload"])
@pytest.mark.parametrize("code", sorted(ERRNOS))
@pytest.mark.parametrize("mode", ["file", "directory"])
def test_a_failed_read_skips_that_candidate(what, code, mode, run_dir, caplog):
    with CheckpointManager(run_dir, keep_last=None, last_alias=None) as manager:
        for step in (10, 20, 30):
            if mode == "file":
                manager.save(tensor_state(step), step=step, epoch=0)
            else:
                with manager.stage(step=step, epoch=0) as staging, staging.open_file("shard.bin") as f:
                    f.write(os.urandom(4096))
    reader = FaultyReader(what=what, errno_=ERRNOS[code], match=NEWEST)
    found = resolve(run_dir, reader=reader)
    assert found is not None and found.name == OLDER, "one unreadable candidate must not stop the resolve"
    assert reader.failed and f"skipping {os.path.join(run_dir, NEWEST)}" in caplog.text
    manager = CheckpointManager(run_dir, reader=reader, keep_last=None, last_alias=None)
    statuses = {c.name: c.status for c in manager.checkpoints()}
    assert statuses[NEWEST] == "unreadable" and statuses[OLDER] == "valid"
    with manager:
        assert manager.resolve(quarantine=True).name == OLDER
    # Unreadable is not corrupt: the writer does not quarantine it, and once the disk reads again it resolves.
    assert not os.path.isdir(os.path.join(run_dir, ".ckptmgr", "quarantine"))
    assert resolve(run_dir).name == NEWEST


def test_every_read_failing_is_no_checkpoint_not_a_crash(make_run, run_dir):
    make_run()
    reader = FaultyReader(what="any", errno_=errno.EIO)
    assert resolve(run_dir, reader=reader) is None
    with pytest.raises(NoValidCheckpointError, match="none valid"):
        CheckpointManager(run_dir, reader=reader).resolve(strict=True)


def test_a_record_that_cannot_be_read_is_reported_as_unreadable(make_run, run_dir):
    make_run(last_alias=None)
    reader = FaultyReader(what="manifest", errno_=errno.EACCES, match=NEWEST)
    rows = {c.name: (c.status, c.problems) for c in CheckpointManager(run_dir, reader=reader).checkpoints()}
    status, problems = rows[NEWEST]
    assert status == "unreadable" and "permission denied" in problems[0]


def test_random_read_faults_never_return_what_cannot_be_trusted(tmp_path):
    """Random faults over random candidates: resolve returns the newest checkpoint none of whose reads failed,
    or None, and never raises."""
    rng = random.Random(7)
    run_dir = str(tmp_path / "run")
    with CheckpointManager(run_dir, keep_last=None, last_alias=None) as manager:
        for step in range(1, 7):
            manager.save(tensor_state(step), step=step * 10, epoch=0)
    names = [f"epoch=0-step={s * 10}.ckpt" for s in range(1, 7)]
    injected = 0
    for _ in range(READ_TRIALS):
        hit = rng.sample(names, rng.randrange(0, len(names) + 1))
        code = rng.choice(list(ERRNOS.values()))
        what = rng.choice(["manifest", "payload"])
        readers = [FaultyReader(what=what, errno_=code, match=name) for name in hit]
        found = resolve(run_dir, reader=_Chain(readers))
        intact = [n for n in names if n not in hit]
        expected = intact[-1] if intact else None
        assert (found.name if found else None) == expected
        injected += sum(len(r.failed) for r in readers)
    assert injected >= READ_TRIALS  # faults really fired


class _Chain(FaultyReader):
    """Several faulty readers at once (one per damaged candidate)."""

    def __init__(self, readers: list[FaultyReader]):
        super().__init__()
        self.readers = readers

    def _maybe_fail(self, kind: str, path: str) -> None:
        for reader in self.readers:
            reader._maybe_fail(kind, path)
