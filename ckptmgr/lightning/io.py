"""ManagedCheckpointIO: lets Lightning load managed checkpoint directories, verified.

It wraps the strategy's own CheckpointIO (a Lightning plugin, set through the
public ``strategy.checkpoint_io`` property): saving and removal pass through
unchanged; loading a managed checkpoint directory verifies every file first
and then loads its payload. A corrupt checkpoint raises instead of loading.
"""

from __future__ import annotations

import os
from typing import Any

from . import _compat
from .checkpoint import is_managed, verified_load_path


class _ManagedCheckpointIOMixin:
    def __init__(self, inner: Any):
        self.inner = inner
        # Set by ManagedCheckpoint(async_save=True) for the one save it is making: (saver, manager, staging).
        self.async_target: Any = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if self.async_target is None:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        saver, manager, handle = self.async_target
        self.async_target = None
        snapshot = saver.buffers.snapshot(checkpoint)  # the only part that blocks training

        def persist() -> Any:
            handle.save_torch(snapshot, os.path.basename(str(path)), torch_crc32=manager.torch_crc32)
            return manager.commit(handle, replace=True)

        saver.submit_save(persist)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if is_managed(str(path)):
            path = verified_load_path(str(path))
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


ManagedCheckpointIO = type("ManagedCheckpointIO", (_ManagedCheckpointIOMixin, *_compat.fabric_checkpoint_io_bases()),
                           {"__module__": __name__, "__doc__": __doc__})
