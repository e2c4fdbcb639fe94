"""ckptmgr: atomic, checksummed, verify-and-fall-back checkpoints for PyTorch training.

Importing ckptmgr does not import torch: the commands that only read and hash
(verify, list, resolve, walk) start fast and never unpickle.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .catalog import Checkpoint  # noqa: E402
from .errors import (  # noqa: E402
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
from .hashing import config_fingerprint  # noqa: E402
from .manager import CheckpointManager  # noqa: E402
from .retention import KeepEpochEnds, KeepEveryNSteps, KeepLast  # noqa: E402
from .verify import Status, VerifyResult, verify_checkpoint  # noqa: E402

__all__ = [
    "AccessDeniedError",
    "Checkpoint",
    "CheckpointManager",
    "CkptMgrError",
    "CommitError",
    "ConfigMismatchError",
    "InvalidCheckpointError",
    "KeepEpochEnds",
    "KeepEveryNSteps",
    "KeepLast",
    "ManifestError",
    "NoValidCheckpointError",
    "NotACheckpointError",
    "PathNotFoundError",
    "Status",
    "UsageError",
    "VerifyResult",
    "WriterLockedError",
    "__version__",
    "config_fingerprint",
    "verify_checkpoint",
]
