"""One writer per run directory.

The lock is ``filelock``'s flock on ``.ckptmgr/writer.lock``: the kernel drops
it when the holder dies, so a lock left by a killed process is recovered
without guessing. Beside it, ``writer.json`` names the holder (host, pid,
since) so that a refused second writer can say who holds the run.
"""

from __future__ import annotations

import json
import os
import socket
import time

import filelock

from .errors import WriterLockedError, from_os_error
from .naming import STATE_DIR

LOCK_NAME = "writer.lock"
OWNER_NAME = "writer.json"


class WriterLock:
    def __init__(self, run_dir: str, *, timeout: float = 0.0):
        self.state_dir = os.path.join(run_dir, STATE_DIR)
        self.owner_path = os.path.join(self.state_dir, OWNER_NAME)
        # Not thread-local: the lock belongs to the writer process, whose background
        # thread (async saves) commits under it too.
        self._lock = filelock.FileLock(os.path.join(self.state_dir, LOCK_NAME), timeout=timeout, thread_local=False)
        self.timeout = timeout

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> None:
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            self._lock.acquire()
        except filelock.Timeout:
            raise WriterLockedError(
                os.path.dirname(self.state_dir),
                f"another writer holds this run directory ({describe_owner(self.owner_path)})",
                hint="stop that process, or use a different run directory",
            ) from None
        except OSError as exc:
            raise from_os_error(self.state_dir, "taking the writer lock", exc) from exc
        self._write_owner()

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        try:
            os.unlink(self.owner_path)
        except OSError:
            pass
        self._lock.release()

    def _write_owner(self) -> None:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since_unix": time.time()}
        tmp = f"{self.owner_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(owner, f)
        os.replace(tmp, self.owner_path)


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
