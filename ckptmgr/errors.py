"""The ckptmgr exception tree.

Every error the library raises on purpose derives from :class:`CkptMgrError`,
names the path it concerns, says what failed, and carries the CLI exit code
that reports it::

    CkptMgrError                          exit 1
    ├── UsageError (ValueError)           exit 2   bad arguments
    ├── PathNotFoundError (FileNotFoundError)  exit 2   the path does not exist
    ├── NotACheckpointError               exit 3   the path holds no checkpoint
    ├── AccessDeniedError (PermissionError)    exit 4   the OS refused access
    ├── WriterLockedError                 exit 5   another writer holds the run
    ├── InvalidCheckpointError            exit 1   verification failed
    │   └── ManifestError                 exit 1   manifest unreadable or malformed
    ├── NoValidCheckpointError            exit 1   candidates exist, none verifies
    ├── CommitError                       exit 6   a save could not be made durable
    ├── ConfigMismatchError               exit 7   checkpoint from another experiment
    └── StorageError (OSError)            exit 8   the storage failed a read or an operation (EIO, ESTALE, ...)

Errors from the operating system are converted at one boundary
(:func:`from_os_error`), so callers see a ckptmgr error with the path in it.
Every error survives pickling (Modal and multiprocessing carry exceptions
between processes that way).
"""

from __future__ import annotations

import errno
import os


class CkptMgrError(Exception):
    """Root of every error ckptmgr raises on purpose."""

    exit_code = 1

    def __init__(self, path: str | os.PathLike[str] | None, message: str, hint: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        self.hint = hint
        text = message if self.path is None else f"{self.path}: {message}"
        super().__init__(text if hint is None else f"{text} ({hint})")

    def __reduce__(self) -> tuple:
        return (type(self), (self.path, self.message, self.hint))


class UsageError(CkptMgrError, ValueError):
    """Bad arguments (a ValueError too, so code that catches those keeps working)."""

    exit_code = 2


class PathNotFoundError(CkptMgrError, FileNotFoundError):
    exit_code = 2


class NotACheckpointError(CkptMgrError):
    exit_code = 3


class AccessDeniedError(CkptMgrError, PermissionError):
    exit_code = 4


class WriterLockedError(CkptMgrError):
    """Another process holds the run directory's writer lock."""

    exit_code = 5


class InvalidCheckpointError(CkptMgrError):
    """A checkpoint failed verification."""


class ManifestError(InvalidCheckpointError):
    """A manifest is missing, unreadable, or does not follow FORMAT.md."""


class NoValidCheckpointError(CkptMgrError):
    """Checkpoints exist but none of them verifies."""


class CommitError(CkptMgrError):
    """A save could not be made durable; it was not acknowledged."""

    exit_code = 6


class ConfigMismatchError(CkptMgrError):
    """The checkpoint was written by an experiment with another config."""

    exit_code = 7


class StorageError(CkptMgrError, OSError):
    """The storage failed an operation (an I/O error, a stale handle, a full disk outside a save)."""

    exit_code = 8


def from_os_error(path: str | os.PathLike[str], action: str, exc: OSError, *, saving: bool = False) -> CkptMgrError:
    """Convert an OSError raised while doing ``action`` on ``path``.

    ``saving``: the operation was part of a save, so an I/O failure means the
    save was not made: :class:`CommitError`. Elsewhere it is a :class:`StorageError`.
    """
    if isinstance(exc, CkptMgrError):
        return exc
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOENT:
        return PathNotFoundError(path, f"{action} failed: no such file or directory")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AccessDeniedError(path, f"{action} failed: permission denied")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device"
    cls = CommitError if saving else StorageError
    return cls(path, f"{action} failed: {reason} (errno {exc.errno})")
