"""Asynchronous saves: snapshot to host memory, return to training, persist and commit in the background.

The snapshot copies every tensor into host buffers that are allocated once and
reused by later saves (pinned for CUDA tensors, so the device-to-host copy
runs at full bandwidth). With ``overlap=True`` (the default) ``save`` only
issues the copy and returns: it runs beside the next step's forward and
backward, and the next optimizer step (or any other in-place write of the
state) waits for it (see ckptmgr.snapshot). With ``overlap=False`` the step is
blocked for the whole copy. A single background worker then waits for the
copy and writes, hashes and commits the checkpoint through the manager.
Rules that keep it safe:

- at most one save in flight: a new save first waits for the previous one;
- jobs run in submission order on one worker, and a job queued after a failed
  save (a deletion, say) is not run, so the previous checkpoint is never
  deleted before the new one commits (the manager's retention already runs
  only after a commit);
- an error in the background is raised by the next call (``save``, ``check``,
  ``wait`` or ``close``) and never swallowed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .catalog import Checkpoint
from .errors import UsageError
from .manager import CheckpointManager
from .snapshot import Snapshot, SnapshotBuffers, release_all

log = logging.getLogger(__name__)


class AsyncCheckpointer:
    """Background saves through a CheckpointManager."""

    def __init__(self, manager: CheckpointManager | None, *, pin_memory: bool | None = None, overlap: bool = True,
                 guard: bool = True):
        """``overlap``: return before the copy is done (it overlaps the next forward/backward).
        ``guard``: wait for the copy before any in-place write of the state on this thread, not only
        before ``optimizer.step`` (turn off under code a ``TorchDispatchMode`` must not see)."""
        self.manager = manager
        self.overlap = overlap
        self.buffers = SnapshotBuffers(pin_memory=pin_memory, guard=guard)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptmgr-async")
        self._in_flight: Future | None = None
        self._failed: BaseException | None = None
        self._lock = threading.Lock()
        self.last_checkpoint: Checkpoint | None = None
        self.persist_seconds: list[float] = []
        self.snapshots: list[Snapshot] = []  # the recent ones, for their timings

    def save(self, state: Any, *, step: int, epoch: int | None = None, **kwargs: Any) -> None:
        """Snapshot ``state`` now (blocking only for the copy) and persist it in the background."""
        self.wait()
        if self.manager is None:
            raise UsageError(None, "AsyncCheckpointer.save needs a manager (this one only runs submitted jobs)")
        manager = self.manager
        snapshot = self.start_snapshot(state)
        self.submit_save(lambda: manager.save(snapshot.wait(), step=step, epoch=epoch, **kwargs))

    def start_snapshot(self, state: Any) -> Snapshot:
        """The copy of ``state`` a background job persists (``snapshot.wait()`` gives its bytes)."""
        snapshot = self.buffers.start(state)
        if not self.overlap:
            snapshot.release_writers()  # training resumes only once the copy is complete
        self.snapshots.append(snapshot)
        del self.snapshots[:-16]
        return snapshot

    @staticmethod
    def release_writers() -> None:
        """Call before writing the saved state (``optimizer.step`` does it by itself): waits for the copy."""
        release_all()

    def submit_save(self, job: Callable[[], Any]) -> None:
        """Run a save job in the background as *the* save in flight (timed for stop decisions)."""

        def timed() -> Any:
            started = time.monotonic()
            result = job()
            self.persist_seconds.append(time.monotonic() - started)
            return result

        self._in_flight = self.submit(timed)

    def submit(self, job: Callable[[], Any]) -> Future:
        """Run ``job`` on the worker after everything submitted before; skipped after a failure."""

        def guarded() -> Any:
            if self._failed is not None:
                return None  # never act (e.g. delete) after a save that did not commit
            try:
                result = job()
            except BaseException as exc:
                self._failed = exc
                raise
            if isinstance(result, Checkpoint):
                self.last_checkpoint = result
            return result

        return self._worker.submit(guarded)

    def check(self) -> None:
        """Raise the error of a background save that has failed (call once per training step)."""
        if self._failed is not None:
            error, self._failed = self._failed, None
            raise error

    def wait(self) -> Checkpoint | None:
        """Block until the save in flight is committed; raise its error."""
        release_all()
        future, self._in_flight = self._in_flight, None
        if future is not None:
            try:
                future.result()
            except BaseException:
                pass  # recorded by `guarded`; raised by check() below, exactly once
        self._worker.submit(lambda: None).result()  # drain queued jobs (deletions)
        self.check()
        return self.last_checkpoint

    @property
    def busy(self) -> bool:
        return self._in_flight is not None and not self._in_flight.done()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._worker.shutdown(wait=True)

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
