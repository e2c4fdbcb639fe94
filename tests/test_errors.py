"""errors: OS errors are converted at one boundary, naming the path and what failed."""

from __future__ import annotations

import errno

import pytest

from ckptmgr import errors


@pytest.mark.parametrize("code, saving, cls", [
    (errno.ENOENT, False, errors.PathNotFoundError), (errno.EACCES, False, errors.AccessDeniedError),
    (errno.EPERM, True, errors.AccessDeniedError), (errno.EIO, False, errors.StorageError),
    (errno.ESTALE, False, errors.StorageError), (errno.EIO, True, errors.CommitError),
    (errno.ENOSPC, True, errors.CommitError), (errno.ENOSPC, False, errors.StorageError),
])
def test_os_errors_map_to_one_class_each(code, saving, cls):
    converted = errors.from_os_error("/runs/x", "doing it", OSError(code, "boom"), saving=saving)
    assert type(converted) is cls and converted.path == "/runs/x" and "doing it failed" in converted.message


def test_storage_errors_are_os_errors_and_commit_errors_mean_a_failed_save():
    assert issubclass(errors.StorageError, OSError) and not issubclass(errors.CommitError, OSError)
    assert errors.StorageError.exit_code == 8 and errors.CommitError.exit_code == 6


def test_a_ckptmgr_error_passes_through_unchanged():
    original = errors.WriterLockedError("/runs/x", "locked")
    assert errors.from_os_error("/runs/x", "x", original) is original  # type: ignore[arg-type]
