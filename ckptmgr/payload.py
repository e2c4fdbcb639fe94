"""``torch.save`` payloads written once, in order, and hashed beside the write by a thread pool.

``torch.save`` produces its zip file sequentially, record after record, and
almost all of its bytes are the tensors' own memory. Here ``torch.save``
writes into a :class:`_Layout` instead of a file: small pieces (zip headers,
the pickle) are copied, the tensors' bytes are only referenced. The file's
64 MiB chunks (the unit of the format's digest, see hashing.py) are then
written in order, in large positional writes, while a thread pool hashes
them from the same memory: the file is never read back, and hashing costs
no time beside the write. The file is byte for byte what ``torch.save``
would have written.

Only memory that stays valid until the last chunk is written may be
referenced: the storages of the CPU tensors found in the saved object
(through dicts, lists and tuples). Anything else ``torch.save`` hands over is
copied. A state holding tensors on another device goes the sequential way
(``torch.save`` into a :class:`HashingWriter`), since ``torch.save`` copies
those to temporary CPU buffers one at a time.
"""

from __future__ import annotations

import bisect
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import xxhash

from .hashing import CHUNK_BYTES, HashingWriter, chunk_count, combine, default_workers
from .storage import Storage


def save(storage: Storage, f: BinaryIO, obj: Any, *, workers: int | None = None) -> tuple[int, str]:
    """``torch.save(obj)`` into the new, empty file ``f``; return ``(size, digest)``."""
    import torch

    ranges = _cpu_storage_ranges(obj)
    if ranges is None:
        writer = HashingWriter(f)
        torch.save(obj, writer)
        return writer.size, writer.hexdigest()
    layout = _Layout(ranges)
    torch.save(obj, layout)
    return layout.size, layout.persist(storage, f, workers=workers or default_workers())


def _cpu_storage_ranges(obj: Any) -> list[tuple[int, int]] | None:
    """Sorted (start, end) addresses of the CPU tensors' storages in ``obj``; None if any tensor is elsewhere."""
    import torch

    ranges: list[tuple[int, int]] = []
    stack = [obj]
    seen: set[int] = set()  # containers already walked: a state may refer to one twice, or to itself
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if item.device.type != "cpu":
                return None
            storage = item.untyped_storage()
            ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sorted(ranges)


class _Layout:
    """A write-only stream that records the file as (offset, bytes) segments instead of writing it."""

    def __init__(self, stable: list[tuple[int, int]]):
        self._stable = stable
        self._starts = [start for start, _ in stable]
        self.offsets: list[int] = []
        self.segments: list[memoryview] = []
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if n:
            if not self._is_stable(view):
                view = memoryview(bytes(view))  # the caller may free or reuse it once write returns
            self.offsets.append(self.size)
            self.segments.append(view)
            self.size += n
        return n

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def _is_stable(self, view: memoryview) -> bool:
        import numpy

        start = numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and start + len(view) <= self._stable[i][1]

    def chunk(self, index: int) -> tuple[int, list[memoryview]]:
        """The file offset of chunk ``index`` and the pieces of memory that make it up."""
        lo = index * CHUNK_BYTES
        hi = min(lo + CHUNK_BYTES, self.size)
        pieces = []
        i = max(0, bisect.bisect_right(self.offsets, lo) - 1)
        while i < len(self.segments) and self.offsets[i] < hi:
            start = self.offsets[i]
            segment = self.segments[i]
            pieces.append(segment[max(lo - start, 0) : min(hi - start, len(segment))])
            i += 1
        return lo, pieces

    def persist(self, storage: Storage, f: BinaryIO, *, workers: int) -> str:
        """Write every chunk in order while a thread pool hashes them from the same memory; return the digest.

        The writes stay sequential and large, as a plain write of the same bytes would be (a file's
        page-cache writes serialise on its inode anyway); hashing runs beside them, so it costs no
        time of its own. The file is never read back.
        """
        chunks = [self.chunk(index) for index in range(chunk_count(self.size))]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptmgr-hash") as pool:
            digests = [pool.submit(_hash_pieces, pieces) for _, pieces in chunks]
            try:
                for offset, pieces in chunks:
                    storage.write_at(f, pieces, offset)
            except BaseException:
                for pending in digests:
                    pending.cancel()
                raise
            return combine([d.result() for d in digests])


def _hash_pieces(pieces: list[memoryview]) -> bytes:
    hasher = xxhash.xxh3_128()
    for piece in pieces:
        hasher.update(piece)
    return hasher.digest()
