"""Output formats for export: safetensors written as a stream, and torch ``.bin``.

safetensors' own ``save_file`` needs every tensor of a file in memory at once;
here the header is computed from the planned shapes first, then each tensor's
bytes are written as soon as the tensor is assembled, so a file never has to
exist in memory. The layout is the format's own (8-byte little-endian header
length, JSON header padded with spaces to a multiple of 8, data in header
order); the tests read every output back with the ``safetensors`` library.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


@dataclass
class Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Shard:
    filename: str
    tensors: list[Planned] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Sequence[Planned], *, stem: str, suffix: str, max_bytes: int | None) -> list[Shard]:
    """Split tensors, in order, into files of at most ``max_bytes`` (a larger tensor gets its own)."""
    if max_bytes is None:
        return [Shard(f"{stem}{suffix}", list(tensors))]
    groups: list[list[Planned]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    total = len(groups)
    return [Shard(f"{stem}-{i + 1:05d}-of-{total:05d}{suffix}", group) for i, group in enumerate(groups)]


def safetensors_header(tensors: Sequence[Planned], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{t.name}: dtype {t.dtype} has no safetensors equivalent")
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(len(encoded) + 8) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_tensor_bytes(f: BinaryIO, tensor: torch.Tensor) -> None:
    """Raw little-endian bytes, without an extra copy for contiguous tensors."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    f.write(memoryview(data.numpy()))
