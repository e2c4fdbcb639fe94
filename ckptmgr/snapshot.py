"""Snapshots of training state into reused host buffers, overlapped with the next step's compute.

An asynchronous save needs the state's bytes as they are at the save, while
training goes on. Parameters and optimizer state change only when something
writes them (the optimizer step, above all), and the next step's forward and
backward only read them. So :meth:`SnapshotBuffers.start` issues the copies
and returns at once: on a side CUDA stream for device tensors (ordered after
the work already queued), on a helper thread for CPU tensors. Whoever writes a
snapshotted tensor first waits for the copy:

- every ``torch.optim`` optimizer, through a global step pre-hook installed
  once per process (:func:`release_all` runs before any ``optimizer.step``);
- ``ManagedCheckpoint`` in Lightning's ``on_before_optimizer_step``;
- a guard (a ``TorchDispatchMode``, in place from the snapshot until the next
  optimizer step) for every other in-place write: ``zero_()`` on a state
  tensor, a BatchNorm's running statistics in the next forward, an LR held in
  a tensor, a write through ``.data``. On a GPU the wait is a stream wait
  (the host does not block); on the CPU it waits for the copy thread.

Writes the guard cannot see (another thread; guard turned off) are caught by
the tensors' version counters: a snapshot whose sources changed before the
copy was known complete is *torn*, and persisting it raises
:class:`SnapshotError` instead of committing wrong bytes.

Copies are made storage by storage, into pinned host memory allocated once and
reused by later saves of the same structure, and the snapshot's tensors are
views of those storages with the sources' offsets, strides, types and
``requires_grad``: ``torch.save`` of a snapshot writes the same bytes as
``torch.save`` of the state (the storages' device is recorded as the
source's), storage sharing included. No device memory is allocated.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from .errors import CkptMgrError


class SnapshotError(CkptMgrError):
    """A snapshot's source was written while it was being copied: its bytes are not the step's."""


# -- the waits before writers ------------------------------------------------------------------------
_pending: list[Snapshot] = []  # snapshots whose sources may not be written yet (main thread's view)
_stale_guards: list[_WriteGuard] = []  # guards released from inside dispatch, popped at the next chance
_hook_lock = threading.Lock()
_hook_installed = False
_release_lock = threading.RLock()  # the guard may release from an autograd thread


def release_all() -> None:
    """Let writers of every pending snapshot's sources proceed (each waits for its copy first)."""
    for snapshot in list(_pending):
        snapshot.release_writers()
    _pop_stale_guards()


def _before_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    if _pending or _stale_guards:
        release_all()


def _install_optimizer_hook() -> None:
    """One global ``optimizer.step`` pre-hook per process; it does nothing while no copy is pending.

    Installed once and never removed: a hook removing itself while torch iterates the hooks would fail.
    """
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            register_optimizer_step_pre_hook(_before_optimizer_step)
            _hook_installed = True


def _pop_stale_guards() -> None:
    while _stale_guards and _get_current_dispatch_mode() is _stale_guards[-1]:
        _stale_guards.pop().__exit__(None, None, None)


_WRITTEN_ARGS: dict[Any, tuple[tuple[int, str], ...]] = {}


def _written_args(func: Any) -> tuple[tuple[int, str], ...]:
    """Positions and names of the arguments an operator writes (``Tensor(a!)`` in its schema)."""
    written = _WRITTEN_ARGS.get(func)
    if written is None:
        written = tuple((i, arg.name) for i, arg in enumerate(func._schema.arguments)
                        if arg.alias_info is not None and arg.alias_info.is_write)
        _WRITTEN_ARGS[func] = written
    return written


def _storage_key(value: Any) -> int | None:
    tensor = getattr(value, "_local_tensor", value)  # a DTensor's shard
    try:
        return tensor.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError, AttributeError):
        return None  # a tensor without storage (meta, fake) is not snapshotted


class _WriteGuard(TorchDispatchMode):
    """Before any operator writes a snapshotted storage, wait for the snapshot's copy."""

    def __init__(self, snapshot: Snapshot, storages: set[int]):
        super().__init__()
        self.snapshot: Snapshot | None = snapshot
        self.storages = storages

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        snapshot = self.snapshot
        if snapshot is not None:
            for index, name in _written_args(func):
                value = args[index] if index < len(args) else kwargs.get(name)
                values = value if isinstance(value, (list, tuple)) else (value,)
                if any(_storage_key(v) in self.storages for v in values if isinstance(v, torch.Tensor)):
                    snapshot.release_writers()
                    break
        return func(*args, **kwargs)


# -- one snapshot --------------------------------------------------------------------------------------
class Snapshot:
    """A copy in flight of a state's tensors; ``state`` is the copied structure (host tensors).

    ``release_writers()`` (the training thread, before writing a source) orders those writes after the
    copy; ``wait()`` (any thread, before reading ``state``) blocks until the bytes are in the buffers
    and raises :class:`SnapshotError` if a source was written while it was copied.
    """

    def __init__(self, state: Any, versions: list[tuple[str, torch.Tensor, int]],
                 events: dict[torch.device, Any], copied: Future | None):
        self.state = state
        self._versions = versions
        self._events = events
        self._copied = copied
        self._lock = threading.Lock()
        self._torn: list[str] | None = None  # None until judged; then the keys written during the copy
        self._released = False
        self.guard: _WriteGuard | None = None
        self.issue_seconds = 0.0  # the training thread's time in start()
        self.wait_seconds = 0.0  # the training thread's time in release_writers()

    def release_writers(self) -> None:
        """Writers of the sources may proceed once the copy is done; idempotent."""
        with _release_lock:
            if self._released:
                return
            started = time.perf_counter()
            for device, event in self._events.items():
                torch.cuda.current_stream(device).wait_event(event)  # the GPU orders the writes; the host runs on
            if self._copied is not None:
                self._copied.result()
            self._judge()  # anything written before this point was not ordered after the copy
            self._released = True
            if self in _pending:
                _pending.remove(self)
            guard, self.guard = self.guard, None
            if guard is not None:
                guard.snapshot = None
                _stale_guards.append(guard)
                _pop_stale_guards()  # from inside the guard's own dispatch it is popped at the next chance
            self.wait_seconds += time.perf_counter() - started

    def wait(self) -> Any:
        """Block until the copy is complete; return the copied state, or raise if it is torn."""
        for event in self._events.values():
            event.synchronize()
        if self._copied is not None:
            self._copied.result()
        self._judge()
        if self._torn:
            shown = ", ".join(self._torn[:5]) + (" ..." if len(self._torn) > 5 else "")
            raise SnapshotError(None, f"tensors written in place while being snapshotted: {shown}",
                                hint="the save was not committed; ckptmgr waits before optimizer.step and "
                                     "in-place operators on the training thread, not for writes from other "
                                     "threads or with guard=False")
        return self.state

    def _judge(self) -> None:
        """Decide once, at the first moment the copy is known ordered before any further write."""
        with self._lock:
            if self._torn is None:
                self._torn = [key for key, tensor, version in self._versions if tensor._version != version]
                self._versions = []  # the sources are no longer needed: do not keep temporaries alive


class SnapshotBuffers:
    """Host buffers for snapshots, allocated once and reused by saves of the same structure.

    A buffer is keyed by where its tensor sits in the state and its storage's size; one whose key no
    later save uses stays allocated until the SnapshotBuffers is dropped. The caller makes sure a
    buffer is not copied into while an earlier snapshot in it is still being persisted (one save in
    flight: AsyncCheckpointer waits for the previous save first).
    """

    def __init__(self, *, pin_memory: bool | None = None, guard: bool = True):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.guard = guard
        self._buffers: dict[str, torch.UntypedStorage] = {}
        self._streams: dict[torch.device, Any] = {}
        self._copier: ThreadPoolExecutor | None = None

    def start(self, obj: Any, *, prefix: str = "") -> Snapshot:
        """Issue the copies of ``obj``'s tensors and return at once; see the module docstring."""
        started = time.perf_counter()
        _install_optimizer_hook()
        sources: dict[int, torch.UntypedStorage] = {}  # by storage identity, those with bytes to copy
        copies: dict[int, torch.UntypedStorage] = {}
        versions: list[tuple[str, torch.Tensor, int]] = []
        state = self._copy(obj, prefix, sources, copies, versions, {})
        events, copied = self._issue(sources, copies)
        snapshot = Snapshot(state, versions, events, copied)
        if sources:
            _pending.append(snapshot)
            if self.guard:
                snapshot.guard = _WriteGuard(snapshot, {source.data_ptr() for source in sources.values()})
                snapshot.guard.__enter__()
        snapshot.issue_seconds = time.perf_counter() - started
        return snapshot

    def snapshot(self, obj: Any) -> Any:
        """A blocking snapshot: the copy is complete when this returns."""
        snapshot = self.start(obj)
        snapshot.release_writers()
        return snapshot.wait()

    # -- building the copy -------------------------------------------------------------------------
    def _copy(self, obj: Any, key: str, sources: dict, copies: dict, versions: list, seen: dict[int, Any]) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:  # the same tensor twice stays one tensor (torch.save memoizes it)
                seen[id(obj)] = self._copy_tensor(obj, key, sources, copies, versions)
            return seen[id(obj)]
        if isinstance(obj, dict):
            copied = {k: self._copy(v, f"{key}/{k}", sources, copies, versions, seen) for k, v in obj.items()}
            if type(obj) is dict:
                return copied
            typed = type(obj)(copied)  # an OrderedDict keeps its type, and its attributes (a state dict's
            for name, value in getattr(obj, "__dict__", {}).items():  # _metadata) are pickled with it
                setattr(typed, name, self._copy(value, f"{key}.{name}", sources, copies, versions, seen))
            return typed
        if isinstance(obj, (list, tuple)):
            items = [self._copy(v, f"{key}/{i}", sources, copies, versions, seen) for i, v in enumerate(obj)]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return obj  # leaves (numbers, strings, None, configs) are not written by training

    def _copy_tensor(self, tensor: torch.Tensor, key: str, sources: dict, copies: dict,
                     versions: list) -> torch.Tensor:
        source = tensor.untyped_storage()
        identity = source._cdata  # the storage torch.save sees: views of one storage share one copy
        buffer = copies.get(identity)
        if buffer is None:
            buffer = copies[identity] = self._buffer(f"{key}#{source.nbytes()}", source)
            if source.nbytes():
                sources[identity] = source
        versions.append((key, tensor, tensor._version))
        copy = torch.empty(0, dtype=tensor.dtype).set_(buffer, tensor.storage_offset(), tensor.size(),
                                                       tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            copy = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
        elif tensor.requires_grad:
            copy.requires_grad_(True)
        if getattr(tensor, "__dict__", None):
            copy.__dict__.update(tensor.__dict__)  # python attributes are pickled with the tensor
        return copy

    def _buffer(self, key: str, source: torch.UntypedStorage) -> torch.UntypedStorage:
        buffer = self._buffers.get(key)
        if buffer is None:
            pin = self.pin_memory and source.device.type == "cuda"
            buffer = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
            self._buffers[key] = buffer
        if source.device.type != "cpu" and buffer.data_ptr() not in _DEVICE_OF:
            _DEVICE_OF[buffer.data_ptr()] = str(source.device)
            # Forgotten with the buffer: memory allocated later at that address is someone else's.
            weakref.finalize(buffer, _DEVICE_OF.pop, buffer.data_ptr(), None)
        return buffer

    def _issue(self, sources: dict[int, torch.UntypedStorage],
               copies: dict[int, torch.UntypedStorage]) -> tuple[dict[torch.device, Any], Future | None]:
        """Queue the device copies on a side stream per device; hand the CPU copies to the copy thread."""
        by_device: dict[torch.device, list[int]] = {}
        for identity, source in sources.items():
            by_device.setdefault(source.device, []).append(identity)
        events: dict[torch.device, Any] = {}
        host: list[int] = by_device.pop(torch.device("cpu"), [])
        for device, identities in by_device.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # after the step that made these bytes
            with torch.cuda.stream(stream):
                for identity in identities:
                    src = _bytes(sources[identity])
                    _bytes(copies[identity]).copy_(src, non_blocking=True)
                    src.record_stream(stream)  # a source freed meanwhile is not reused before the copy
            events[device] = torch.cuda.Event()
            events[device].record(stream)
        copied = None
        if host:
            if self._copier is None:
                self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptmgr-snapshot")
            pairs = [(_bytes(sources[p]), _bytes(copies[p])) for p in host]
            copied = self._copier.submit(_copy_all, pairs)
        return events, copied

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self._buffers.values())


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for source, buffer in pairs:
        buffer.copy_(source)


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)


# -- the storages' device, as torch.save records it ------------------------------------------------------
_DEVICE_OF: dict[int, str] = {}  # a host buffer's address -> the device of the storage it copies


def _location_of_copy(storage: Any) -> str | None:
    """torch.save's location tag for a snapshot buffer: the source's device, so the bytes match its save."""
    untyped = storage.untyped() if hasattr(storage, "untyped") else storage
    return _DEVICE_OF.get(untyped.data_ptr()) if untyped.device.type == "cpu" else None


def _no_restore(storage: Any, location: str) -> None:
    return None  # loading goes through torch's own deserializers


torch.serialization.register_package(5, _location_of_copy, _no_restore)
