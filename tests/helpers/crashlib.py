"""The crash harness's shared pieces: deterministic saves of every kind, and the invariant check.

Save modes (each a path through the commit protocol of docs/FORMAT.md):

- ``file``: ``manager.save`` of a tensor state, a single-file checkpoint (payload writer, chunked writes);
- ``raw-file``: a single-file checkpoint written through ``open_file`` (no torch: fast to start, for
  the random-time kills);
- ``directory``: ``manager.stage``: a file hashed while written and one written "by others" (as DeepSpeed);
- ``replace-file`` / ``replace-directory``: the same, saved over one fixed name (Lightning's fixed
  ``filename=`` without a version counter), the old checkpoint replaced in place.

Every save moves the ``last`` alias (a hard link with its own record) and runs retention (``keep_last=2``).
"""

from __future__ import annotations

import os

from ckptmgr import CheckpointManager
from ckptmgr.catalog import resolve, scan, verify_candidate
from ckptmgr.naming import ASIDE_DIR, STAGING_DIR, TRASH_DIR
from ckptmgr.records import read_records
from ckptmgr.verify import Status, verify_checkpoint

PAYLOAD_BYTES = 96 * 1024
MODES = ("file", "raw-file", "directory", "replace-file", "replace-directory")
FIXED_NAME = "fixed.ckpt"


def payload_for(step: int) -> bytes:
    """Deterministic content per step, so a resolved checkpoint proves it holds its own step's data."""
    block = f"step={step};".encode()
    return (block * (PAYLOAD_BYTES // len(block) + 1))[:PAYLOAD_BYTES]


def save_step(manager: CheckpointManager, step: int, mode: str = "directory") -> None:
    name = FIXED_NAME if mode.startswith("replace") else None
    replace = mode.startswith("replace")
    if mode == "raw-file":
        with manager.stage(step=step, epoch=step // 5, shape="file") as staging:
            with staging.open_file() as f:
                f.write(payload_for(step))
        return
    if mode.endswith("file"):
        import torch

        state = {"data": torch.frombuffer(bytearray(payload_for(step)), dtype=torch.uint8), "step": step}
        manager.save(state, step=step, epoch=step // 5, name=name, replace=replace)
        return
    with manager.stage(step=step, epoch=step // 5, name=name, replace=replace) as staging:
        with staging.open_file("model.bin") as f:
            data = payload_for(step)
            for i in range(0, len(data), 16 * 1024):
                f.write(data[i : i + 16 * 1024])
        os.makedirs(os.path.join(staging.path, "optim"))
        with open(os.path.join(staging.path, "optim", "rank0.bin"), "wb") as f:  # as DeepSpeed would
            f.write(payload_for(step)[::-1])


def holds_its_step(path: str, step: int) -> bool:
    if os.path.isdir(path):
        with open(os.path.join(path, "model.bin"), "rb") as f:
            return f.read() == payload_for(step)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # raw-file mode: the payload itself
            f.seek(0)
            return f.read() == payload_for(step)
    import torch

    state = torch.load(path, weights_only=True)
    return state["step"] == step and bytes(state["data"].numpy()) == payload_for(step)


def check_invariants(run_dir: str, last_acked: int | None, *, torn_allowed: bool = False) -> int | None:
    """Assert the recovery invariants; return the resolved step."""
    found = resolve(run_dir)
    if last_acked is not None:
        assert found is not None, f"acknowledged step {last_acked} lost: nothing resolves"
        assert found.step >= last_acked, f"resolved step {found.step} older than acknowledged {last_acked}"
    if found is not None:
        assert verify_checkpoint(found.path).status is Status.VALID
        assert holds_its_step(found.path, found.step), "resolved checkpoint holds another step's data"
    if not torn_allowed:  # without power loss, nothing published is ever torn
        for candidate in scan(run_dir):
            if candidate.form in ("managed", "in-dir"):
                result = verify_candidate(candidate)
                assert result.status is Status.VALID, f"published but invalid: {candidate.path}: {result.reason}"
    # The next writer rolls back or removes whatever the crash left.
    with CheckpointManager(run_dir, keep_last=2):
        pass
    for area in (STAGING_DIR, TRASH_DIR, ASIDE_DIR):
        leftovers = os.listdir(os.path.join(run_dir, area)) if os.path.isdir(os.path.join(run_dir, area)) else []
        assert not leftovers, (area, leftovers)
    assert not [r for r in read_records(run_dir, include_pending=True) if r.pending]
    after = resolve(run_dir)
    if found is not None:  # recovery never loses what resolved before it
        assert after is not None and after.step >= found.step
    return None if found is None else found.step
