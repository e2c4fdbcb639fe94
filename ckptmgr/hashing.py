"""xxh3_128 hashing: while writing (one pass) and of files already on disk.

python-xxhash >= 4 releases the GIL for inputs above 64 KiB, so hashing large
chunks in threads scales with cores; reads release the GIL too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

import xxhash

CHUNK_BYTES = 8 * 1024 * 1024
ALGORITHM = "xxh3_128"


def digest_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


class HashingWriter:
    """A write-only binary stream that hashes every byte on its way to ``raw``.

    ``torch.save`` and ``json.dump`` write through it, so a payload is hashed
    exactly once, while it is produced, with no second read.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._hasher = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hasher.update(data)
        written = self._raw.write(data)
        self.size += len(data)
        return written if written is not None else len(data)

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def hash_file(
    path: str | os.PathLike[str],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Return ``(size, xxh3_128 hex digest)`` of the file at ``path``.

    The file is opened with O_NOFOLLOW: checkpoint files are never links.
    """
    hasher = xxhash.xxh3_128()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    size = 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            hasher.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return size, hasher.hexdigest()


def config_fingerprint(config: object) -> str:
    """A stable fingerprint of an experiment config (anything JSON can encode).

    Keys are sorted, so dict order does not matter; values that JSON cannot
    encode are represented by ``repr``.
    """
    import json

    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=repr)
    return digest_bytes(canonical.encode())
