"""PyTorch Distributed Checkpoint (DCP) directories on disk: read ``.metadata`` without running code.

A DCP checkpoint (``torch.distributed.checkpoint.save`` with its filesystem
writer; FSDP2, torchtitan, Lightning's sharded saves) is a directory::

    .metadata          pickled ``Metadata``: every tensor's chunks and where each chunk's bytes are
    __0_0.distcp       rank 0's items, each a ``torch.save`` blob at an offset
    __1_0.distcp       rank 1's ...
    meta.pt            (Lightning only) the rest of the Lightning checkpoint, from rank 0

DCP writes ``.metadata`` last and never checks it against the data files: a
save cut short, or a rank's file lost, surfaces as an error deep inside a load
(or not at all). This module reads ``.metadata`` with an unpickler that builds
only DCP's own metadata classes (a hostile file cannot run code), and checks
that every file it names is there and long enough for the items it places
there. Managed DCP checkpoints are checked by their manifest instead; this is
what ``verify`` and ``seal`` can say about one written without ckptmgr.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CkptMgrError, InvalidCheckpointError
from .storage import LOCAL_READER, Reader

if TYPE_CHECKING:
    import torch

METADATA_NAME = ".metadata"
LIGHTNING_META_NAME = "meta.pt"  # Lightning's sharded layout: the non-tensor part of its checkpoint
MAX_METADATA_BYTES = 1 << 30  # a DCP metadata file of a 1T-parameter model is well under this
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")

# What DCP's .metadata references (torch 2.4 to 2.13): its own dataclasses, torch.Size, dtypes, layouts.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes and nothing else (no function call a hostile pickle could name)."""

    def find_class(self, module: str, name: str) -> Any:
        import torch  # only here: the CLI's read-only commands start without torch unless they meet DCP

        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


@dataclass(frozen=True)
class Item:
    """One stored item: a tensor chunk or a bytes object, and where its bytes are."""

    fqn: str
    file: str
    offset: int
    length: int
    chunk_offsets: tuple[int, ...] | None  # None for a bytes item
    transformed: bool  # written through DCP's stream extensions (compression...)


@dataclass
class DcpMetadata:
    """What ckptmgr needs of a ``.metadata``: the items, each tensor's shape and dtype, and the raw object."""

    raw: Any
    items: list[Item]
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # fqn -> (full shape, dtype)
    chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]  # fqn -> [(offsets, sizes)]

    @property
    def files(self) -> set[str]:
        return {item.file for item in self.items}


def is_dcp_layout(path: str) -> bool:
    """A directory DCP's filesystem writer wrote (its ``.metadata`` is a regular file)."""
    try:
        return stat.S_ISREG(os.lstat(os.path.join(path, METADATA_NAME)).st_mode)
    except OSError:
        return False


def owner_rank(relpath: str) -> int:
    """The rank that wrote a file of DCP's layout (``__R_N.distcp``); rank 0 for ``.metadata`` and the rest."""
    match = _RANK_FILE.search(relpath)
    return int(match.group(1)) if match else 0


def read_metadata(path: str, reader: Reader = LOCAL_READER) -> DcpMetadata:
    """Parse ``path/.metadata``. Raises InvalidCheckpointError naming what is wrong with it."""
    where = os.path.join(path, METADATA_NAME)
    try:
        size = os.lstat(where).st_size
        if size > MAX_METADATA_BYTES:
            raise InvalidCheckpointError(where, f"DCP metadata of {size} bytes is implausibly large")
        data = reader.read_small(where, MAX_METADATA_BYTES)
    except OSError as exc:
        raise InvalidCheckpointError(where, f"DCP metadata unreadable ({exc.strerror or exc})") from exc
    return parse_metadata(data, where)


def parse_metadata(data: bytes, where: str) -> DcpMetadata:
    try:
        raw = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # a hostile or torn pickle raises anything
        raise InvalidCheckpointError(where, f"not DCP metadata ({exc.__class__.__name__}: {str(exc)[:200]})") from exc
    try:
        return describe(raw, where)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidCheckpointError(where, f"DCP metadata of an unexpected shape ({exc})") from exc


def describe(raw: Any, where: str) -> DcpMetadata:
    """What ckptmgr needs of a DCP ``Metadata`` object (parsed from a file, or fresh from a save)."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    if not isinstance(raw, Metadata) or not isinstance(raw.state_dict_metadata, dict):
        raise InvalidCheckpointError(where, f"not DCP metadata (a {type(raw).__name__})")
    storage = raw.storage_data if isinstance(raw.storage_data, dict) else {}
    items: list[Item] = []
    for index, info in storage.items():
        file = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not _is_plain_name(file) or not _is_count(offset) or not _is_count(length):
            raise InvalidCheckpointError(where, f"item {getattr(index, 'fqn', '?')!r}: unusable location {info!r}")
        offsets = getattr(index, "offset", None)
        items.append(Item(str(index.fqn), file, offset, length, tuple(offsets) if offsets is not None else None,
                          bool(getattr(info, "transform_descriptors", None))))
    tensors, chunks = {}, {}
    for fqn, entry in raw.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            tensors[fqn] = (tuple(int(d) for d in entry.size), entry.properties.dtype)
            chunks[fqn] = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
    located = {item.fqn for item in items}
    unplaced = sorted(set(raw.state_dict_metadata) - located)
    if unplaced:
        raise InvalidCheckpointError(where, f"DCP metadata places no bytes for {len(unplaced)} entries "
                                            f"(first: {unplaced[0]!r})")
    return DcpMetadata(raw, items, tensors, chunks)


def _is_plain_name(name: object) -> bool:
    """A file name directly inside the checkpoint directory (never a path out of it)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def completeness_problems(path: str, metadata: DcpMetadata) -> list[str]:
    """Files ``.metadata`` names that are missing, not regular files, or too short for their items."""
    needed: dict[str, int] = {}
    for item in metadata.items:
        needed[item.file] = max(needed.get(item.file, 0), item.offset + item.length)
    problems = []
    for name in sorted(needed):
        try:
            st = os.lstat(os.path.join(path, name))
        except FileNotFoundError:
            problems.append(f"{name}: missing (named in {METADATA_NAME})")
            continue
        except OSError as exc:
            problems.append(f"{name}: unreadable ({exc.strerror})")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{name}: not a regular file")
        elif st.st_size < needed[name]:
            problems.append(f"{name}: {st.st_size} bytes, {METADATA_NAME} places items up to byte {needed[name]}")
    return problems


def dcp_missing(path: str) -> str | None:
    """What an unmanaged DCP directory lacks to be loadable, in one line (None when complete)."""
    try:
        metadata = read_metadata(path)
    except CkptMgrError as exc:
        return exc.message
    problems = completeness_problems(path, metadata)
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def item_crc_problems(path: str, metadata: DcpMetadata, reader: Reader = LOCAL_READER) -> tuple[int, list[str]]:
    """Check the zip CRC32s ``torch.save`` stored in every item: (items checked, problems).

    DCP's default format writes each tensor chunk as its own ``torch.save`` zip at an offset; torch
    stores a CRC32 per record and never checks it on load. Items in another format are not checked.
    """
    import zipfile

    checked, problems = 0, []
    for item in metadata.items:
        if item.transformed:
            continue
        try:
            blob = read_range(reader, os.path.join(path, item.file), item.offset, item.length)
        except OSError as exc:
            problems.append(f"{item.file}: unreadable ({exc.strerror or exc})")
            break
        if blob[:4] != b"PK\x03\x04":
            continue  # a bytes item, or the safetensors format: nothing to check here
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as archive:
                records = [info for info in archive.infolist() if info.file_size > 0]
                if records and all(info.CRC == 0 for info in records):
                    continue  # written with torch's CRC32 off
                bad = archive.testzip()
        except Exception as exc:  # zipfile raises assorted errors on damaged input
            problems.append(f"{item.file}: item {item.fqn!r} is not an intact torch record ({exc.__class__.__name__})")
            continue
        checked += 1
        if bad is not None:
            problems.append(f"{item.file}: CRC32 mismatch in item {item.fqn!r}")
    return checked, problems


def read_range(reader: Reader, path: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``; raises EIO-like OSError when the file ends first."""
    fd = reader.open_read(path)
    try:
        parts, done = [], 0
        while done < length:
            data = os.pread(fd, min(length - done, 1 << 24), offset + done)
            if not data:
                raise OSError(errno.ENODATA, f"file ends at byte {offset + done}, item needs {offset + length}")
            parts.append(data)
            done += len(data)
        return b"".join(parts)
    finally:
        os.close(fd)


def shards_by_rank(metadata: DcpMetadata, extra: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Each rank's files (``.metadata`` and ``extra`` files such as Lightning's ``meta.pt`` count as rank 0's)."""
    shards: dict[str, list[str]] = {}
    for name in sorted(metadata.files | {METADATA_NAME, *extra}):
        shards.setdefault(str(owner_rank(name)), []).append(name)
    return shards


def shards_in(path: str, metadata: DcpMetadata) -> dict[str, list[str]]:
    """Each rank's files in the DCP directory ``path``; Lightning's ``meta.pt`` counts when it is there."""
    extra = (LIGHTNING_META_NAME,) if os.path.isfile(os.path.join(path, LIGHTNING_META_NAME)) else ()
    return shards_by_rank(metadata, extra)


__all__ = ["DcpMetadata", "Item", "LIGHTNING_META_NAME", "METADATA_NAME", "completeness_problems", "dcp_missing",
           "describe", "is_dcp_layout", "item_crc_problems", "owner_rank", "parse_metadata", "read_metadata",
           "read_range", "shards_by_rank", "shards_in"]
