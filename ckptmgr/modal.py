"""Modal: what a run on a Volume needs beyond one process's writer lock.

- :class:`VolumeCommit`: the durability hook. A save is acknowledged only once ``volume.commit()``
  returned; with a :class:`WriterLease` it first refreshes the lease (committed with the save) and
  refuses to commit at all when this writer may have lost the lease (fencing by its own clock).
- :class:`WriterLease`: one writer per run *across containers*. The flock of the writer lock is per
  kernel; containers that share a Volume see each other only through committed files. The lease is
  ``RUN/.ckptmgr/lease.json`` (holder, heartbeat, time to live), committed with each save.
- :class:`ChainRecord`: who spawned whom in a chain of invocations (``RUN/.ckptmgr/chain.json``), so a
  retried input that already spawned its successor returns at once, and an invocation that is not the
  recorded successor refuses to run.
- :func:`commit_every_node`: on a multi-node run (``@modal.experimental.clustered``), every
  container's local rank 0 commits its own writes before global rank 0 publishes.

The limits, said plainly: a Modal Volume has no compare-and-swap and is last-writer-wins per file.
Two containers that read the lease in the same instant can both take it; the lease narrows that to
the window between reading and committing it (both are checked again at the first save, and a writer
whose heartbeat is older than the lease's time to live stops committing). A container sees another's
commits only after ``volume.reload()``, which fails while files are open: each invocation reads the
lease and the chain record at its start, in a fresh container (``single_use_containers=True``).

Nothing here imports ``modal``: the Volume is any object with ``commit()`` (and ``reload()``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .errors import CkptMgrError, CommitError, WriterLockedError
from .naming import STATE_DIR

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
CHAIN_NAME = "chain.json"
DEFAULT_LEASE_TTL_S = 3600.0


class Volume(Protocol):
    def commit(self) -> None: ...


class LeaseHeldError(WriterLockedError):
    """Another container holds this run's writer lease (exit 5)."""


class ChainConflictError(WriterLockedError):
    """This invocation is not the one the run's chain record expects (exit 5)."""


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: str, data: dict[str, Any]) -> None:
    """Whole or not at all: temporary name, fsync, rename (the Volume then commits the new file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- the writer lease ---------------------------------------------------------------
@dataclass
class WriterLease:
    """One writer per run across containers: ``RUN/.ckptmgr/lease.json``, refreshed with every save.

    ``holder`` identifies the writer across retries of the same input (the function call id): a
    retry takes over its own earlier attempt's lease, anyone else waits for it to expire.
    """

    run_dir: str
    holder: str
    ttl_s: float = DEFAULT_LEASE_TTL_S
    clock: Callable[[], float] = time.time
    last_heartbeat: float | None = field(default=None, init=False)

    @property
    def path(self) -> str:
        return os.path.join(self.run_dir, STATE_DIR, LEASE_NAME)

    def current(self) -> dict[str, Any] | None:
        return _read_json(self.path)

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeldError` naming the holder while its lease is fresh."""
        lease = self.current()
        now = self.clock()
        if lease is not None and lease.get("holder") != self.holder:
            age = now - float(lease.get("heartbeat_unix", 0) or 0)
            ttl = float(lease.get("ttl_s", self.ttl_s) or self.ttl_s)
            if 0 <= age < ttl:
                raise LeaseHeldError(
                    self.run_dir, f"another writer holds this run's lease ({lease.get('holder')}, on "
                                  f"{lease.get('host', '?')}, heartbeat {age:.0f} s ago, expires in {ttl - age:.0f} s)",
                    hint="wait for it to finish or expire; one chain per run")
            if lease.get("holder"):
                log.warning("[ckptmgr] %s: taking over the expired lease of %s", self.run_dir, lease.get("holder"))
        self.heartbeat()

    def heartbeat(self) -> None:
        now = self.clock()
        _write_json(self.path, {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                                "heartbeat_unix": now, "ttl_s": self.ttl_s})
        self.last_heartbeat = now

    def check_still_ours(self) -> None:
        """Fencing by our own clock: past the time to live since our last committed heartbeat, another
        container may have taken the lease; then we must not commit anything."""
        if self.last_heartbeat is None:
            raise CommitError(self.run_dir, "the writer lease was never taken: not committing")
        age = self.clock() - self.last_heartbeat
        if age >= self.ttl_s:
            raise CommitError(self.run_dir, f"this writer's lease expired {age - self.ttl_s:.0f} s ago (no heartbeat "
                                            "committed in time): another writer may own the run; not committing")

    def release(self) -> None:
        lease = self.current()
        if lease is not None and lease.get("holder") == self.holder:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class VolumeCommit:
    """ckptmgr's durability hook on a Modal Volume: the save is acknowledged once ``commit()`` returned.

    With a lease, the heartbeat is refreshed first (so it is committed with the save), and a writer
    whose lease may have been taken over refuses to commit.
    """

    def __init__(self, volume: Volume, *, lease: WriterLease | None = None):
        self.volume = volume
        self.lease = lease
        self.commits = 0

    def persist(self, path: str) -> None:
        if self.lease is not None:
            self.lease.check_still_ours()
            self.lease.heartbeat()
        self.volume.commit()
        self.commits += 1


# -- the chain record ---------------------------------------------------------------
@dataclass
class ChainRecord:
    """``RUN/.ckptmgr/chain.json``: one chain per run, and who spawned whom in it."""

    run_dir: str
    chain: str
    invocations: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_unix: float = field(default_factory=time.time)

    @staticmethod
    def path_for(run_dir: str) -> str:
        return os.path.join(run_dir, STATE_DIR, CHAIN_NAME)

    @classmethod
    def load(cls, run_dir: str) -> ChainRecord | None:
        data = _read_json(cls.path_for(run_dir))
        if data is None or not isinstance(data.get("chain"), str) or not isinstance(data.get("invocations"), dict):
            return None
        return cls(run_dir, data["chain"], data["invocations"], float(data.get("created_unix", 0) or 0))

    def save(self) -> None:
        data = asdict(self)
        del data["run_dir"]
        _write_json(self.path_for(self.run_dir), data)

    def entry(self, invocation: int) -> dict[str, Any] | None:
        return self.invocations.get(str(invocation))

    def admit(self, invocation: int, call_id: str) -> dict[str, Any] | None:
        """May ``call_id`` run ``invocation``? Returns the successor already spawned (a retried input that
        had continued the chain: return at once), None to go ahead; raises when another call owns the step."""
        mine = self.entry(invocation)
        if mine is None:
            if invocation == 1:
                self.invocations["1"] = {"call_id": call_id, "spawned": None, "started_unix": time.time()}
                return None
            raise ChainConflictError(self.run_dir, f"invocation {invocation} is not recorded in chain {self.chain}: "
                                                   "it was not spawned by this chain")
        if mine.get("call_id") not in (None, call_id):
            raise ChainConflictError(self.run_dir, f"invocation {invocation} of chain {self.chain} belongs to call "
                                                   f"{mine.get('call_id')}, not {call_id}: refusing to run twice")
        mine["call_id"] = call_id
        mine.setdefault("started_unix", time.time())
        if mine.get("spawned") or mine.get("spawning"):
            # Spawning had begun: the successor exists, or the crash came between marking and spawning (the
            # chain then stops here, safely: one writer is better than two).
            return {"invocation": invocation + 1, "call_id": mine.get("spawned")}
        return None

    def record_spawn(self, invocation: int, call_id: str) -> None:
        self.invocations[str(invocation)]["spawned"] = call_id
        self.invocations[str(invocation + 1)] = {"call_id": call_id, "spawned": None, "spawned_by": invocation}

    def finish(self, invocation: int, outcome: str) -> None:
        entry = self.invocations.setdefault(str(invocation), {})
        entry["outcome"] = outcome
        entry["ended_unix"] = time.time()


def start_chain(run_dir: str, chain: str) -> ChainRecord:
    """A new chain owns the run from now on (the fresh start, or the first `modal run` of a run)."""
    record = ChainRecord(run_dir, chain)
    record.save()
    return record


def check_no_live_chain(run_dir: str, *, ttl_s: float = DEFAULT_LEASE_TTL_S, clock: Callable[[], float] = time.time
                        ) -> None:
    """Refuse a new chain while the run's lease says a writer is alive (a second `modal run`)."""
    lease = _read_json(os.path.join(run_dir, STATE_DIR, LEASE_NAME))
    if lease is None:
        return
    age = clock() - float(lease.get("heartbeat_unix", 0) or 0)
    if 0 <= age < float(lease.get("ttl_s", ttl_s) or ttl_s):
        raise LeaseHeldError(run_dir, f"a chain is already training this run ({lease.get('holder')}, heartbeat "
                                      f"{age:.0f} s ago)", hint="follow it with `modal app logs`, or wait for it")


# -- several containers (a clustered run) -------------------------------------------
def commit_every_node(*, local_rank: int, node_commit: Callable[[], None] | None, barrier: Callable[[], None]) -> None:
    """Before global rank 0 publishes: every container's local rank 0 commits that container's writes.

    A collective: every rank calls it after its files are written and hashed. On one container (or
    without a per-node hook) it is a barrier only.
    """
    barrier()  # every rank's files are written and fsynced in its container's view
    if node_commit is not None and local_rank == 0:
        node_commit()
    barrier()  # every container's writes are committed: rank 0 may reload and publish


__all__ = ["ChainConflictError", "ChainRecord", "CkptMgrError", "LeaseHeldError", "VolumeCommit", "WriterLease",
           "check_no_live_chain", "commit_every_node", "start_chain"]
