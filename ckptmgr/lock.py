"""One writer per run directory.

The lock is ``filelock``'s flock on ``.ckptmgr/writer.lock``: the kernel drops it
when the holder dies, so a lock left by a killed process is recovered without
guessing. Beside it, ``writer.json`` names the holder (host, pid, since) so that
a refused second writer can say who holds the run.

The writer is a process: every manager of one run in one process (the trainer's,
the Lightning callback's, an async saver's thread) shares the one flock, counted,
and it is released when the last of them closes. A second process is refused.
The flock is per kernel: across machines (containers sharing a Modal Volume) see
the writer lease in ``ckptmgr.modal``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import filelock

from .errors import WriterLockedError, from_os_error
from .naming import STATE_DIR

LOCK_NAME = "writer.lock"
OWNER_NAME = "writer.json"

_HELD: dict[str, list] = {}  # lock file (real path) -> [FileLock, holders in this process]
_HELD_LOCK = threading.Lock()


class WriterLock:
    def __init__(self, run_dir: str, *, timeout: float = 0.0):
        self.state_dir = os.path.join(run_dir, STATE_DIR)
        self.owner_path = os.path.join(self.state_dir, OWNER_NAME)
        self.lock_path = os.path.join(self.state_dir, LOCK_NAME)
        self.timeout = timeout
        self._key: str | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> None:
        if self._key is not None:
            return
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            key = os.path.realpath(self.lock_path)
        except OSError as exc:
            raise from_os_error(self.state_dir, "creating ckptmgr's state directory", exc) from exc
        with _HELD_LOCK:
            if key in _HELD:  # this process is the writer already
                _HELD[key][1] += 1
                self._key = key
                return
            # Not thread-local: the lock belongs to the writer process, whose background
            # thread (async saves) commits under it too.
            lock = filelock.FileLock(self.lock_path, timeout=self.timeout, thread_local=False)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise WriterLockedError(
                    os.path.dirname(self.state_dir),
                    f"another writer holds this run directory ({describe_owner(self.owner_path)})",
                    hint="stop that process, or use a different run directory",
                ) from None
            except OSError as exc:
                raise from_os_error(self.state_dir, "taking the writer lock", exc) from exc
            try:
                self._write_owner()
            except OSError as exc:
                lock.release()
                raise from_os_error(self.owner_path, "recording the writer", exc) from exc
            _HELD[key] = [lock, 1]
            self._key = key

    def release(self) -> None:
        if self._key is None:
            return
        with _HELD_LOCK:
            entry = _HELD[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[self._key]
                try:
                    os.unlink(self.owner_path)
                except OSError:
                    pass
                entry[0].release()
            self._key = None

    def _write_owner(self) -> None:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since_unix": time.time()}
        tmp = f"{self.owner_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(owner, f)
            os.replace(tmp, self.owner_path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def read_owner(owner_path: str) -> dict | None:
    try:
        with open(owner_path) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe_owner(owner_path: str) -> str:
    owner = read_owner(owner_path)
    if owner is None:
        return "holder unknown"
    since = owner.get("since_unix")
    age = f", for {time.time() - since:.0f} s" if isinstance(since, (int, float)) else ""
    return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}{age}"
