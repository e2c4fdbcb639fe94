"""The storage seam: every file operation a writer makes goes through here.

``Storage`` is a small Protocol; :class:`LocalStorage` implements it on a POSIX
filesystem (a local disk or a mounted Modal Volume). Tests wrap it with
:class:`ckptmgr.testing.FaultyStorage` to inject crashes, ENOSPC, EIO and lost
unsynced data at every step of the commit protocol, instead of patching ``os``.

``DurabilityHook`` is the other seam: called after a checkpoint is published
and synced, it makes the save durable beyond this machine (a Modal Volume's
``commit()``). A save is acknowledged only after the hook returns.

``Reader`` is the read side's seam: readers (verify, resolve, list, walk)
open manifests and payload files only through it, so tests inject EIO,
ESTALE or EACCES on any read (:class:`ckptmgr.testing.FaultyReader`) and
check that a failed read skips that one candidate, never the whole resolve.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import BinaryIO, Protocol, runtime_checkable

_IOV_MAX = 1024  # pieces per pwritev call (Linux's IOV_MAX)


@runtime_checkable
class Storage(Protocol):
    def makedirs(self, path: str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def open_write(self, path: str) -> BinaryIO: ...
    def write_at(self, f: BinaryIO, pieces: list[memoryview], offset: int) -> None: ...
    def fsync(self, f: BinaryIO) -> None: ...
    def sync_file(self, path: str) -> None: ...
    def sync_dir(self, path: str) -> None: ...
    def rename_noreplace(self, src: str, dst: str) -> None: ...
    def replace(self, src: str, dst: str) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def link(self, src: str, dst: str) -> None: ...
    def copy_file(self, src: str, dst: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def remove_tree(self, path: str) -> None: ...


@runtime_checkable
class Reader(Protocol):
    def read_small(self, path: str, limit: int) -> bytes: ...
    def open_read(self, path: str) -> int: ...


class LocalReader:
    """Reads without following symlinks (a link inside a checkpoint is never trusted)."""

    def read_small(self, path: str, limit: int) -> bytes:
        """At most ``limit`` bytes of a small file (a manifest); refuses anything but a regular file."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            chunks, left = [], limit
            while left > 0:
                data = os.read(fd, min(left, 1 << 20))
                if not data:
                    break
                chunks.append(data)
                left -= len(data)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def open_read(self, path: str) -> int:
        """A descriptor to hash from; O_NONBLOCK so that a FIFO never blocks the reader."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", path)
        return fd


LOCAL_READER = LocalReader()


class DurabilityHook(Protocol):
    """Makes published data durable beyond this process (e.g. a Volume commit)."""

    def persist(self, path: str) -> None: ...


class NoDurabilityHook:
    """Local disks are durable once fsync returns."""

    def persist(self, path: str) -> None:
        return None


class LocalStorage:
    """POSIX filesystem storage with explicit, checked fsyncs."""

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def open_write(self, path: str) -> BinaryIO:
        # O_EXCL: a writer never writes into a file it did not create.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        return os.fdopen(fd, "wb", buffering=1024 * 1024)

    def write_at(self, f: BinaryIO, pieces: list[memoryview], offset: int) -> None:
        """Write ``pieces`` back to back at ``offset`` (pwritev: one call for many pieces, no shared file offset)."""
        fd = f.fileno()
        pieces = [p for p in pieces if len(p)]
        while pieces:
            batch = pieces[:_IOV_MAX]
            written = os.pwritev(fd, batch, offset)
            if written <= 0:
                raise OSError(errno.EIO, "pwritev wrote nothing", getattr(f, "name", "?"))
            offset += written
            while written and pieces:  # drop what was written, keep the rest of a piece cut short
                if written >= len(pieces[0]):
                    written -= len(pieces.pop(0))
                else:
                    pieces[0], written = pieces[0][written:], 0

    def fsync(self, f: BinaryIO) -> None:
        # An fsync error means the data may be lost; it is raised, never retried
        # (after a failed fsync the kernel may drop the dirty pages: "fsyncgate").
        f.flush()
        os.fsync(f.fileno())

    def sync_file(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_dir(self, path: str) -> None:
        # Makes renames and new entries in ``path`` durable. Some FUSE layers
        # refuse fsync on directories (EINVAL); there is nothing more to do then.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise
        finally:
            os.close(fd)

    def rename_noreplace(self, src: str, dst: str) -> None:
        # The writer lock excludes other writers, so check-then-rename cannot
        # race with another ckptmgr; rename(2) of a directory onto a non-empty
        # directory fails anyway.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "destination exists", dst)
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, path)

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst, follow_symlinks=False)

    def copy_file(self, src: str, dst: str) -> None:
        shutil.copyfile(src, dst, follow_symlinks=False)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def remove_tree(self, path: str) -> None:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)
