"""File digests: xxh3_128 over 64 MiB chunks, computed while writing or in parallel from disk.

Format version 2 (docs/FORMAT.md) digests a file as follows. The file is cut
into consecutive chunks of ``CHUNK_BYTES`` (the last one shorter); a file of
one chunk (at most 64 MiB, empty included) is digested by plain xxh3_128, a
longer one by xxh3_128 over the concatenated 16-byte digests of its chunks.
Chunks are independent, so one large file is hashed by many threads at once,
both while it is written and when it is verified. Version 1 (``PLAIN``) is
xxh3_128 of the whole file, still read for checkpoints written by it.

python-xxhash >= 4 releases the GIL for inputs above 64 KiB and ``os.preadv``
releases it while reading, so the threads run on separate cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, TypeVar

import xxhash

CHUNKED = "xxh3_128-chunked-64MiB"  # format version 2: what writers produce
PLAIN = "xxh3_128"  # format version 1: whole-file xxh3_128
CHUNK_BYTES = 64 * 1024 * 1024
READ_BYTES = 1024 * 1024  # one read; a thread reuses one buffer (small: it stays in cache, fresh memory is slow)

_Progress = Callable[[int], None] | None
T = TypeVar("T")
R = TypeVar("R")


def digest_bytes(data: bytes) -> str:
    """Plain xxh3_128 of a small byte string (manifest self-hash, fingerprints)."""
    return xxhash.xxh3_128_hexdigest(data)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def combine(chunk_digests: Sequence[bytes]) -> str:
    """The file digest from its chunks' 16-byte digests, in order (see the module docstring)."""
    if len(chunk_digests) == 1:
        return chunk_digests[0].hex()
    return xxhash.xxh3_128_hexdigest(b"".join(chunk_digests))


def chunk_count(size: int) -> int:
    return max(1, -(-size // CHUNK_BYTES))


class ChunkedHasher:
    """The chunked digest of a stream of bytes fed in order (one thread)."""

    def __init__(self) -> None:
        self._chunk = xxhash.xxh3_128()
        self._in_chunk = 0
        self._digests: list[bytes] = []
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        while len(view):
            if self._in_chunk == CHUNK_BYTES:
                self._digests.append(self._chunk.digest())
                self._chunk, self._in_chunk = xxhash.xxh3_128(), 0
            take = min(len(view), CHUNK_BYTES - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]

    def hexdigest(self) -> str:
        return combine([*self._digests, self._chunk.digest()])


class HashingWriter:
    """A write-only binary stream that hashes every byte on its way to ``raw``.

    ``torch.save`` and ``json.dump`` write through it, so a payload is hashed
    exactly once, while it is produced, with no second read.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._hasher = ChunkedHasher()

    @property
    def size(self) -> int:
        return self._hasher.size

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hasher.update(data)
        written = self._raw.write(data)
        return written if written is not None else len(memoryview(data).cast("B"))

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class FileChanged(OSError):
    """The file's size changed while it was being hashed."""


_local = threading.local()


def _read_buffer() -> memoryview:
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = memoryview(bytearray(READ_BYTES))
    return buffer


def hash_range(path: str, offset: int, length: int, expected_size: int, on_bytes: _Progress = None,
               reader: Any = None) -> bytes:
    """The 16-byte xxh3_128 of ``length`` bytes of ``path`` at ``offset``.

    Each call opens its own descriptor, so the kernel's readahead follows each
    thread's sequential stream. Raises :class:`FileChanged` when the file is
    not ``expected_size`` bytes long (truncated or grown underneath us).
    """
    hasher = xxhash.xxh3_128()
    buffer = _read_buffer()
    fd = reader.open_read(path) if reader is not None else os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        if os.fstat(fd).st_size != expected_size:
            raise FileChanged(f"size is no longer {expected_size}")
        position, end = offset, offset + length
        while position < end:
            n = os.preadv(fd, [buffer[: min(len(buffer), end - position)]], position)
            if n == 0:
                raise FileChanged("file ended early")
            hasher.update(buffer[:n])
            position += n
            if on_bytes is not None:
                on_bytes(n)
    finally:
        os.close(fd)
    return hasher.digest()


def hash_files(
    files: Sequence[tuple[str, int]],
    *,
    algorithm: str = CHUNKED,
    workers: int | None = None,
    on_bytes: _Progress = None,
    reader: Any = None,
) -> list[str | OSError]:
    """Digest every ``(path, size)`` with ``algorithm``, in parallel across and within files.

    Returns, per file, its hex digest or the OSError that stopped it (a file
    that changed size is a :class:`FileChanged`). The work is one task per
    chunk (per file for ``PLAIN``), so one huge file keeps every thread busy.
    """
    if algorithm not in (CHUNKED, PLAIN):
        raise ValueError(f"unknown hash algorithm {algorithm!r}")
    tasks: list[tuple[int, int, int]] = []  # (file index, offset, length)
    for index, (_, size) in enumerate(files):
        if algorithm == PLAIN:
            tasks.append((index, 0, size))
        else:
            tasks += [(index, k * CHUNK_BYTES, min(CHUNK_BYTES, size - k * CHUNK_BYTES))
                      for k in range(chunk_count(size))]
    # Largest files first, so one huge file does not start last and finish alone.
    tasks.sort(key=lambda t: (-files[t[0]][1], t[0], t[1]))

    def run(task: tuple[int, int, int]) -> bytes | OSError:
        index, offset, length = task
        path, size = files[index]
        try:
            return hash_range(path, offset, max(length, 0), size, on_bytes, reader)
        except OSError as exc:
            return exc

    outcomes = map_in_threads(run, tasks, workers or default_workers())
    digests: list[list[bytes]] = [[] for _ in files]
    failed: dict[int, OSError] = {}
    for (index, _, _), outcome in zip(tasks, outcomes, strict=True):
        if isinstance(outcome, OSError):
            failed.setdefault(index, outcome)
        else:
            digests[index].append(outcome)  # tasks of a file are in offset order
    return [failed[i] if i in failed else combine(digests[i]) for i in range(len(files))]


def map_in_threads(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``workers`` threads; the first exception is re-raised.

    Plain threads rather than concurrent.futures, which imports logging: a tenth of the start-up
    time of ``ckptmgr verify``, which is most of its time on a checkpoint of a gigabyte.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    results: list[Any] = [None] * len(items)
    failures: list[BaseException] = []
    claim = iter(range(len(items))).__next__  # next() on a range iterator is atomic under the GIL

    def worker() -> None:
        try:
            for index in iter(claim, None):  # ends when the range is exhausted
                results[index] = fn(items[index])
        except BaseException as exc:  # reported to the caller below
            failures.append(exc)

    threads = [threading.Thread(target=worker, name="ckptmgr-hash") for _ in range(min(workers, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return results


def config_fingerprint(config: object) -> str:
    """A stable fingerprint of an experiment config (anything JSON can encode).

    Keys are sorted, so dict order does not matter; values that JSON cannot
    encode are represented by ``repr``.
    """
    import json

    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=repr)
    return digest_bytes(canonical.encode())
