"""ckptmgr: atomic, checksummed, verify-and-fall-back checkpoints for PyTorch training.

Importing ckptmgr imports nothing else: the names below load on first use (PEP 562),
so the commands that only read and hash (verify, list, resolve, walk) start fast and
never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_EXPORTS = {
    "Checkpoint": "catalog",
    "CheckpointManager": "manager",
    "KeepEpochEnds": "retention",
    "KeepEveryNSteps": "retention",
    "KeepLast": "retention",
    "Status": "verify",
    "VerifyResult": "verify",
    "verify_checkpoint": "verify",
    "config_fingerprint": "hashing",
    "AccessDeniedError": "errors",
    "CkptMgrError": "errors",
    "CommitError": "errors",
    "ConfigMismatchError": "errors",
    "InvalidCheckpointError": "errors",
    "ManifestError": "errors",
    "NoValidCheckpointError": "errors",
    "NotACheckpointError": "errors",
    "PathNotFoundError": "errors",
    "UsageError": "errors",
    "WriterLockedError": "errors",
}

__all__ = [
    "AccessDeniedError", "Checkpoint", "CheckpointManager", "CkptMgrError", "CommitError", "ConfigMismatchError",
    "InvalidCheckpointError", "KeepEpochEnds", "KeepEveryNSteps", "KeepLast", "ManifestError",
    "NoValidCheckpointError", "NotACheckpointError", "PathNotFoundError", "Status", "UsageError", "VerifyResult",
    "WriterLockedError", "__version__", "config_fingerprint", "verify_checkpoint",
]
assert sorted(__all__) == sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptmgr' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs; nothing is imported at run time
    from .catalog import Checkpoint
    from .errors import (
        AccessDeniedError,
        CkptMgrError,
        CommitError,
        ConfigMismatchError,
        InvalidCheckpointError,
        ManifestError,
        NotACheckpointError,
        NoValidCheckpointError,
        PathNotFoundError,
        UsageError,
        WriterLockedError,
    )
    from .hashing import config_fingerprint
    from .manager import CheckpointManager
    from .retention import KeepEpochEnds, KeepEveryNSteps, KeepLast
    from .verify import Status, VerifyResult, verify_checkpoint
