"""Asynchronous saves: snapshot to CPU, return to training, persist and commit in the background.

The snapshot copies every tensor into CPU buffers that are allocated once and
reused by later saves (pinned for CUDA tensors, so the device-to-host copy
runs at full bandwidth); the training step is blocked only for that copy.
A single background worker then writes, hashes and commits the checkpoint
through the manager. Rules that keep it safe:

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

import torch

from .catalog import Checkpoint
from .manager import CheckpointManager

log = logging.getLogger(__name__)


class SnapshotBuffers:
    """CPU copies of a (nested) state, in buffers reused across saves of the same structure."""

    def __init__(self, *, pin_memory: bool | None = None):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[str, torch.Tensor] = {}

    def snapshot(self, obj: Any) -> Any:
        copied = self._copy(obj, "")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies are complete
        return copied

    def _copy(self, obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._copy_tensor(obj, key)
        if isinstance(obj, dict):
            copied = {k: self._copy(v, f"{key}/{k}") for k, v in obj.items()}
            return copied if type(obj) is dict else type(obj)(copied)  # OrderedDict keeps its type
        if isinstance(obj, (list, tuple)):
            items = [self._copy(v, f"{key}/{i}") for i, v in enumerate(obj)]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return obj  # immutable leaves (numbers, strings, None) need no copy

    def _copy_tensor(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        tensor = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = self.pin_memory and tensor.is_cuda
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class AsyncCheckpointer:
    """Background saves through a CheckpointManager."""

    def __init__(self, manager: CheckpointManager, *, pin_memory: bool | None = None):
        self.manager = manager
        self.buffers = SnapshotBuffers(pin_memory=pin_memory)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptmgr-async")
        self._in_flight: Future | None = None
        self._failed: BaseException | None = None
        self._lock = threading.Lock()
        self.last_checkpoint: Checkpoint | None = None
        self.persist_seconds: list[float] = []

    def save(self, state: Any, *, step: int, epoch: int | None = None, **kwargs: Any) -> None:
        """Snapshot ``state`` now (blocking only for the copy) and persist it in the background."""
        self.wait()
        snapshot = self.buffers.snapshot(state)
        self.submit_save(lambda: self.manager.save(snapshot, step=step, epoch=epoch, **kwargs))

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
