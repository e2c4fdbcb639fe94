"""ManagedCheckpointIO: lets Lightning load managed checkpoint directories, verified.

It wraps the strategy's own CheckpointIO (a Lightning plugin, set through the
public ``strategy.checkpoint_io`` property): saving and removal pass through
unchanged; loading a managed checkpoint directory verifies every file first
and then loads its payload. A corrupt checkpoint raises instead of loading.
"""

from __future__ import annotations

from typing import Any

from . import _compat
from .checkpoint import is_managed, verified_load_path


class _ManagedCheckpointIOMixin:
    def __init__(self, inner: Any):
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

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
