"""ManagedCheckpointIO's behaviour: the CheckpointIO plugin ManagedCheckpoint installs.

It wraps the strategy's own CheckpointIO (set through the public
``strategy.checkpoint_io`` property):

- a save made by ManagedCheckpoint (``target`` set for that one call) is
  written straight into the manager's staging file by ckptmgr's payload
  writer: hashed while written, never through the system temp dir (Lightning's
  own path stages the bytes in ``$TMPDIR`` and moves them); with
  ``async_save`` only a snapshot is taken and the write is queued;
- any other save, and every removal, passes through unchanged;
- loading a managed checkpoint verifies it first: a corrupt one is refused,
  never loaded.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidCheckpointError
from ..records import read_records
from ..verify import Status, has_manifest, records_for, verify_checkpoint


def is_managed(path: str) -> bool:
    """A checkpoint with a commit record (format 3) or a manifest inside (formats 1-2)."""
    run_dir, name = os.path.split(path)
    return bool(records_for(name, read_records(run_dir))) or (os.path.isdir(path) and has_manifest(path))


class ManagedCheckpointIOMixin:
    def __init__(self, inner: Any):
        self.inner = inner
        # Set by ManagedCheckpoint for the one save it is making: (staging handle, manager, AsyncCheckpointer|None).
        self.target: Any = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        target, self.target = self.target, None
        if target is None:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        handle, manager, saver = target
        if saver is None:
            handle.save_torch(checkpoint, torch_crc32=manager.torch_crc32)
            return
        snapshot = saver.start_snapshot(checkpoint)  # training waits only for the copy, and overlaps it

        def persist() -> Any:
            handle.save_torch(snapshot.wait(), torch_crc32=manager.torch_crc32)
            return manager.commit(handle, replace=True)

        handle.submitted = True
        saver.submit_save(persist)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        local = os.path.realpath(str(path)) if os.path.lexists(str(path)) else None
        if local is not None and is_managed(local):
            result = verify_checkpoint(local)
            if result.status is not Status.VALID:
                raise InvalidCheckpointError(str(path), f"refusing to load: {result.reason}")
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
