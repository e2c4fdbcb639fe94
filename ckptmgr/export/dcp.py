"""Consolidated tensors of a PyTorch Distributed Checkpoint, one tensor in memory at a time.

``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` loads the whole
state into memory before writing it. Here each tensor is assembled from its
chunks (every rank's piece, wherever ``.metadata`` places it) into one buffer
the size of that tensor, handed to the writer, and dropped before the next:
peak memory is about the largest tensor, not the checkpoint.

Each stored chunk is a ``torch.save`` blob at an offset in a ``.distcp`` file
(DCP's default format); it is read with ``weights_only``. Non-tensor entries
(``BytesStorageMetadata``: optimizer hyper-parameters, user objects) have no
place in safetensors and are skipped, and counted.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import torch

from ..dcp_layout import Item, read_metadata, read_range
from ..errors import InvalidCheckpointError, NotACheckpointError, UsageError
from ..storage import LOCAL_READER
from .zero import TensorSpec


class DcpReader:
    """The tensors of the DCP checkpoint at ``path`` (names are DCP's flattened keys: ``model.layer.weight``)."""

    def __init__(self, path: str, *, select: tuple[str, ...] = ()):
        self.path = path
        metadata = read_metadata(path)
        transformed = [item.fqn for item in metadata.items if item.transformed]
        if transformed:
            raise UsageError(path, f"items stored through DCP stream extensions (e.g. {transformed[0]!r}) cannot be "
                                   "exported")
        self._items: dict[str, list[Item]] = {}
        for item in metadata.items:
            self._items.setdefault(item.fqn, []).append(item)
        self._tensors = {fqn: spec for fqn, spec in metadata.tensors.items()
                         if not select or fqn.startswith(select)}
        self.skipped_non_tensors = len(set(self._items) - set(metadata.tensors))
        if not self._tensors:
            raise NotACheckpointError(path, "holds no tensors" + (f" starting with {', '.join(select)}"
                                                                  if select else ""))
        self._chunks = metadata.chunks

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(fqn, shape, dtype) for fqn, (shape, dtype) in self._tensors.items()]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for fqn, (shape, dtype) in self._tensors.items():
            yield fqn, self._assemble(fqn, shape, dtype)

    def _assemble(self, fqn: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        full = torch.empty(shape, dtype=dtype)
        covered = 0
        for item in self._items.get(fqn, []):
            chunk = self._read_chunk(item)
            if chunk.dtype != dtype or item.chunk_offsets is None or len(item.chunk_offsets) != len(shape):
                raise InvalidCheckpointError(os.path.join(self.path, item.file),
                                             f"chunk of {fqn!r} does not match its metadata")
            target = full
            for dim, (offset, length) in enumerate(zip(item.chunk_offsets, chunk.shape, strict=True)):
                if offset + length > shape[dim]:
                    raise InvalidCheckpointError(os.path.join(self.path, item.file),
                                                 f"chunk of {fqn!r} lies outside the tensor")
                target = target.narrow(dim, offset, length)
            target.copy_(chunk)
            covered += chunk.numel()
        if covered != full.numel():
            raise InvalidCheckpointError(self.path, f"the chunks of {fqn!r} cover {covered} of {full.numel()} "
                                                    "elements")
        return full

    def _read_chunk(self, item: Item) -> torch.Tensor:
        where = os.path.join(self.path, item.file)
        try:
            blob = read_range(LOCAL_READER, where, item.offset, item.length)
        except OSError as exc:
            raise InvalidCheckpointError(where, f"cannot read chunk of {item.fqn!r} ({exc.strerror or exc})") from exc
        try:
            chunk = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises assorted errors on damaged or foreign bytes
            raise InvalidCheckpointError(where, f"chunk of {item.fqn!r} is not a torch.save tensor "
                                                f"({exc.__class__.__name__})") from exc
        if not isinstance(chunk, torch.Tensor):
            raise InvalidCheckpointError(where, f"chunk of {item.fqn!r} is not a tensor")
        return chunk


__all__ = ["DcpReader"]
