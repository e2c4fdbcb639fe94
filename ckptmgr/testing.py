"""Test doubles shipped with the library: fault-injecting storage and hooks.

:class:`FaultyStorage` wraps :class:`LocalStorage`. Every operation is a
numbered *failpoint*; a :class:`Fault` fires at one of them:

- ``kill``: SIGKILL this process (the real thing; run it in a subprocess);
- ``raise``: raise :class:`InjectedCrash`, a BaseException like Modal's
  ``InputCancellation`` arriving anywhere;
- ``enospc`` / ``eio``: raise the OSError a full or failing disk gives.

It also models what a power loss or a Volume snapshot taken mid-write can
leave (:meth:`FaultyStorage.lose_unsynced`): files never fsynced get torn
(truncated or given a garbage tail) and renames never followed by an fsync
of their directory may be undone.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from .storage import LocalReader, LocalStorage


class InjectedCrash(BaseException):
    """An injected crash: not an Exception, so ordinary handlers don't swallow it."""


@dataclass(frozen=True, kw_only=True)
class Fault:
    at: int  # 1-based index of the failpoint (counting only ``op`` when given)
    action: str = "raise"  # kill | raise | enospc | eio
    op: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ("kill", "raise", "enospc", "eio"):
            raise ValueError(f"unknown fault action {self.action!r}")


@dataclass
class _Pending:
    unsynced_files: set[str] = field(default_factory=set)
    unsynced_renames: list[tuple[str, str]] = field(default_factory=list)
    # (src, dst, copy of what dst held before): a rename over an existing entry, or an unlink (src None)
    unsynced_overwrites: list[tuple[str | None, str, str]] = field(default_factory=list)


class FaultyStorage(LocalStorage):
    def __init__(self, fault: Fault | None = None):
        self.fault = fault
        self.ops: list[tuple[str, str]] = []
        self._counted = 0
        self._pending = _Pending()
        self._lock = threading.Lock()
        self._backups: str | None = None

    # -- failpoints -------------------------------------------------------
    def _failpoint(self, op: str, path: str) -> None:
        with self._lock:  # failpoints are reached from several threads (staged files are fsynced in parallel)
            self.ops.append((op, path))
            fault = self.fault
            if fault is None or (fault.op is not None and fault.op != op):
                return
            self._counted += 1
            if self._counted != fault.at:
                return
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)  # never reached
        if fault.action == "raise":
            raise InjectedCrash(f"injected crash at failpoint {op} {path}")
        code = errno.ENOSPC if fault.action == "enospc" else errno.EIO
        raise OSError(code, os.strerror(code), path)

    # -- the Storage protocol, each call a failpoint ----------------------
    def makedirs(self, path: str) -> None:
        self._failpoint("makedirs", path)
        super().makedirs(path)

    def mkdir(self, path: str) -> None:
        self._failpoint("mkdir", path)
        super().mkdir(path)

    def open_write(self, path: str) -> BinaryIO:
        self._failpoint("open_write", path)
        f = super().open_write(path)
        self._pending.unsynced_files.add(path)
        return _FaultyFile(f, self, path)  # type: ignore[return-value]

    def write_at(self, f: BinaryIO, pieces: list[memoryview], offset: int) -> None:
        path = str(getattr(f, "path", "?"))
        self._failpoint("write", path)
        super().write_at(getattr(f, "raw_file", f), pieces, offset)

    def fsync(self, f: BinaryIO) -> None:
        path = getattr(f, "path", getattr(f, "name", "?"))
        self._failpoint("fsync", str(path))
        super().fsync(getattr(f, "raw_file", f))
        self._pending.unsynced_files.discard(str(path))

    def sync_file(self, path: str) -> None:
        self._failpoint("sync_file", path)
        super().sync_file(path)
        self._pending.unsynced_files.discard(path)

    def sync_dir(self, path: str) -> None:
        self._failpoint("sync_dir", path)
        super().sync_dir(path)
        self._pending.unsynced_renames = [
            (s, d) for s, d in self._pending.unsynced_renames if os.path.dirname(d) != path
        ]
        self._pending.unsynced_overwrites = [
            (s, d, b) for s, d, b in self._pending.unsynced_overwrites if os.path.dirname(d) != path
        ]

    def rename_noreplace(self, src: str, dst: str) -> None:
        self._failpoint("rename", dst)
        super().rename_noreplace(src, dst)
        self._moved(src, dst)

    def replace(self, src: str, dst: str) -> None:
        self._failpoint("replace", dst)
        backup = self._keep_copy(dst)
        super().replace(src, dst)
        if backup is not None:
            self._pending.unsynced_overwrites.append((src, dst, backup))
        else:
            self._moved(src, dst)

    def symlink(self, target: str, path: str) -> None:
        self._failpoint("symlink", path)
        super().symlink(target, path)

    def link(self, src: str, dst: str) -> None:
        self._failpoint("link", dst)
        super().link(src, dst)

    def copy_file(self, src: str, dst: str) -> None:
        self._failpoint("copy_file", dst)
        super().copy_file(src, dst)
        self._pending.unsynced_files.add(dst)

    def unlink(self, path: str) -> None:
        self._failpoint("unlink", path)
        backup = self._keep_copy(path)
        super().unlink(path)
        if backup is not None:
            self._pending.unsynced_overwrites.append((None, path, backup))

    def _keep_copy(self, path: str) -> str | None:
        """What a regular file held before it is replaced or unlinked, so that a power loss can bring it back."""
        if not os.path.isfile(path) or os.path.islink(path):
            return None
        if self._backups is None:
            self._backups = tempfile.mkdtemp(prefix="ckptmgr-faulty-")
        backup = os.path.join(self._backups, f"{len(self._pending.unsynced_overwrites)}-{os.path.basename(path)}")
        shutil.copyfile(path, backup)
        return backup

    def remove_tree(self, path: str) -> None:
        # File by file, each a failpoint: a crash mid-rmtree leaves a half-deleted tree.
        self._failpoint("remove_tree", path)
        if os.path.islink(path) or not os.path.isdir(path):
            super().unlink(path)
            return
        for dirpath, dirnames, filenames in os.walk(path, topdown=False):
            for name in filenames:
                self._failpoint("remove_file", os.path.join(dirpath, name))
                os.unlink(os.path.join(dirpath, name))
            for name in dirnames:
                os.rmdir(os.path.join(dirpath, name))
        os.rmdir(path)

    def _moved(self, src: str, dst: str) -> None:
        self._pending.unsynced_renames.append((src, dst))
        prefix = src + os.sep
        self._pending.unsynced_files = {
            dst + p[len(src):] if p == src or p.startswith(prefix) else p for p in self._pending.unsynced_files
        }

    # -- power loss model -------------------------------------------------
    def lose_unsynced(self, rng: random.Random) -> list[str]:
        """Tear unsynced files and undo unsynced renames at random; return what was done."""
        done = []
        for path in sorted(self._pending.unsynced_files):
            if not os.path.isfile(path) or rng.random() < 0.3:
                continue
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                if rng.random() < 0.5:
                    f.truncate(rng.randrange(size + 1) if size else 0)
                    done.append(f"truncated {path}")
                else:
                    f.seek(rng.randrange(size + 1) if size else 0)
                    f.write(rng.randbytes(rng.randrange(1, 4096)))
                    done.append(f"garbage tail {path}")
        for src, dst in reversed(self._pending.unsynced_renames):
            if rng.random() < 0.5 and os.path.lexists(dst) and not os.path.lexists(src):
                os.rename(dst, src)
                done.append(f"undid rename {dst} -> {src}")
        for src, dst, backup in reversed(self._pending.unsynced_overwrites):
            if rng.random() < 0.5 and os.path.isfile(backup):
                if src is not None and os.path.lexists(dst) and not os.path.lexists(src):
                    os.rename(dst, src)  # the new entry back where it came from
                if not os.path.lexists(dst):
                    shutil.copyfile(backup, dst)  # the old one under its name again
                    done.append(f"undid {'replace' if src else 'unlink'} of {dst}")
        return done


class _FaultyFile:
    """The file object FaultyStorage hands out: writes are failpoints too."""

    def __init__(self, f: BinaryIO, storage: FaultyStorage, path: str):
        self.raw_file = f
        self.path = path
        self._storage = storage

    def write(self, data: bytes) -> int:
        self._storage._failpoint("write", self.path)
        return self.raw_file.write(data)

    def flush(self) -> None:
        self.raw_file.flush()

    def fileno(self) -> int:
        return self.raw_file.fileno()

    def close(self) -> None:
        self.raw_file.close()

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FailingHook:
    """A durability hook that raises, or hangs for ``hang_s`` seconds."""

    def __init__(self, *, hang_s: float = 0.0, error: Exception | None = None):
        self.hang_s = hang_s
        self.error = error
        self.calls: list[str] = []

    def persist(self, path: str) -> None:
        self.calls.append(path)
        if self.hang_s:
            time.sleep(self.hang_s)
        if self.error is not None:
            raise self.error


class FaultyReader(LocalReader):
    """The read seam with faults: reads of matching paths raise the OSError a bad disk or mount gives.

    ``what`` is ``"manifest"`` (commit records and manifests inside directories), ``"payload"`` (files
    hashed by verification) or ``"any"``; ``errno_`` is EIO, ESTALE or EACCES; ``match`` limits the
    fault to paths containing that text; ``times`` is how many reads fail (None: every one).
    """

    def __init__(self, *, what: str = "any", errno_: int = errno.EIO, match: str = "", times: int | None = None):
        if what not in ("manifest", "payload", "any"):
            raise ValueError(f"unknown read fault target {what!r}")
        self.what, self.errno, self.match, self.times = what, errno_, match, times
        self.failed: list[str] = []

    def _maybe_fail(self, kind: str, path: str) -> None:
        if self.what not in (kind, "any") or self.match not in path:
            return
        if self.times is not None and len(self.failed) >= self.times:
            return
        self.failed.append(path)
        raise OSError(self.errno, os.strerror(self.errno), path)

    def read_small(self, path: str, limit: int) -> bytes:
        self._maybe_fail("manifest", path)
        return super().read_small(path, limit)

    def open_read(self, path: str) -> int:
        self._maybe_fail("payload", path)
        return super().open_read(path)
