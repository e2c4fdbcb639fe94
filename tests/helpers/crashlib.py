"""The crash harness's shared pieces: a deterministic save and the invariant check."""

from __future__ import annotations

import os

from ckptmgr import CheckpointManager
from ckptmgr.catalog import resolve, scan
from ckptmgr.naming import is_staging, is_trash
from ckptmgr.verify import Status, verify_checkpoint

PAYLOAD_BYTES = 96 * 1024


def payload_for(step: int) -> bytes:
    """Deterministic content per step, so a resolved checkpoint proves it holds its own step's data."""
    block = f"step={step};".encode()
    return (block * (PAYLOAD_BYTES // len(block) + 1))[:PAYLOAD_BYTES]


def save_step(manager: CheckpointManager, step: int) -> None:
    """One save through both paths: a file hashed while written, and one written 'by others'."""
    with manager.stage(step=step, epoch=step // 5, epoch_end=False) as staging:
        with staging.open_file("model.bin") as f:
            data = payload_for(step)
            for i in range(0, len(data), 16 * 1024):
                f.write(data[i : i + 16 * 1024])
        os.makedirs(os.path.join(staging.path, "optim"))
        with open(os.path.join(staging.path, "optim", "rank0.bin"), "wb") as f:  # as DeepSpeed would
            f.write(payload_for(step)[::-1])


def check_invariants(run_dir: str, last_acked: int | None, *, torn_allowed: bool = False) -> int | None:
    """Assert the recovery invariants; return the resolved step."""
    found = resolve(run_dir)
    if last_acked is not None:
        assert found is not None, f"acknowledged step {last_acked} lost: nothing resolves"
        assert found.step >= last_acked, f"resolved step {found.step} older than acknowledged {last_acked}"
    if found is not None:
        assert verify_checkpoint(found.path).status is Status.VALID
        with open(os.path.join(found.path, "model.bin"), "rb") as f:
            assert f.read() == payload_for(found.step), "resolved checkpoint holds another step's data"
    if not torn_allowed:  # without power loss, nothing published is ever torn
        for candidate in scan(run_dir):
            if candidate.alias_of is None:
                result = verify_checkpoint(candidate.path)
                assert result.status is Status.VALID, f"published but invalid: {candidate.path}: {result.reason}"
    # The next writer cleans up whatever the crash left.
    with CheckpointManager(run_dir, keep_last=2):
        pass
    leftovers = [n for n in os.listdir(run_dir) if is_staging(n) or is_trash(n)]
    assert not leftovers, leftovers
    return None if found is None else found.step
