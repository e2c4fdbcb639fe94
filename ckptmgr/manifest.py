"""The manifest: what a committed checkpoint holds, and proof that it is whole.

A manifest lists every payload file of one checkpoint with its size and
xxh3_128, and ends with a hash of its own canonical encoding so that a torn
or edited manifest never parses. The format is specified in docs/FORMAT.md;
this module is its only reader and writer.

Parsing is strict and bounded: an unknown version, a missing or unknown
field, a wrong type or an out-of-range value is a :class:`ManifestError`,
never a silent default; nesting deeper than ``MAX_DEPTH`` is refused before
anything recurses into it.

Where a manifest lives and what its paths are relative to depends on the
checkpoint's *shape* (format 3):

- ``file``: the checkpoint is one file ``RUN/<name>``; ``files`` holds exactly
  one entry whose path is ``<name>`` (paths are relative to the run directory).
- ``directory``: the checkpoint is the directory ``RUN/<name>/``; paths are
  relative to that directory; ``load_path`` ``"."`` means the directory.

Formats 1 and 2 only had directories, with the manifest inside.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ManifestError
from .hashing import CHUNKED, PLAIN, digest_bytes
from .naming import check_checkpoint_name

MANIFEST_NAME = "ckptmgr-manifest.json"  # inside a directory: formats 1-2, and export outputs
FORMAT_NAME = "ckptmgr"
FORMAT_VERSION = 3  # what writers produce
# Each version's file digest (see hashing.py); readers accept every version listed here.
HASH_ALGORITHMS = {1: PLAIN, 2: CHUNKED, 3: CHUNKED}
SHAPES = ("file", "directory")
KINDS = ("torch", "lightning", "deepspeed", "dcp", "files", "export")
# A manifest larger than this is hostile or broken; it is refused unread.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_FILES = 200_000
MAX_FILE_SIZE = 1 << 50  # 1 PiB: larger sizes are absurd, not big
MAX_DEPTH = 32  # JSON nesting; real manifests use 4

_SELF_HASH_FIELD = "manifest_xxh3_128"
_HEX32 = re.compile(r"[0-9a-f]{32}")
_STRUCTURE = re.compile(rb'["\\\\\[\]{}]')
# A plain relative POSIX path: no leading "/", no empty, "." or ".." component, no backslash or NUL.
_PLAIN_PATH = re.compile(r"(?!/)(?:(?!\.{1,2}(?:/|$))[^/\\\x00]+/)*(?!\.{1,2}$)[^/\\\x00]+")


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    path: str
    size: int
    xxh3_128: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """One checkpoint's manifest (see docs/FORMAT.md)."""

    name: str
    step: int
    epoch: int | None
    sequence: int
    kind: str
    load_path: str
    files: tuple[FileEntry, ...]
    created_unix: float
    shape: str = "directory"
    epoch_end: bool = False
    world_size: int = 1
    layout: dict[str, Any] = field(default_factory=dict)
    config_fingerprint: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    writer: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    alias_of: str | None = None  # format 3: this checkpoint is a link or copy of that one (the `last` alias)
    format_version: int = FORMAT_VERSION

    @property
    def hash_algorithm(self) -> str:
        return HASH_ALGORITHMS[self.format_version]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def is_file(self) -> bool:
        return self.shape == "file"

    def to_json_bytes(self) -> bytes:
        """Canonical encoding, self-hash included."""
        body = _body_dict(self)
        body[_SELF_HASH_FIELD] = digest_bytes(_canonical(body))
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def _body_dict(manifest: Manifest) -> dict[str, Any]:
    body = asdict(manifest)
    body["files"] = [asdict(f) for f in manifest.files]
    body["format"] = FORMAT_NAME
    body["hash_algorithm"] = manifest.hash_algorithm
    if manifest.format_version < 3:  # formats 1-2 had neither: always a directory, never an alias
        del body["shape"], body["alias_of"]
    return body


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# field name -> accepted types; every field is required in the versions that have it
_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "format_version": (int,),
    "hash_algorithm": (str,),
    "name": (str,),
    "step": (int,),
    "epoch": (int, type(None)),
    "sequence": (int,),
    "kind": (str,),
    "load_path": (str,),
    "files": (list,),
    "created_unix": (float, int),
    "epoch_end": (bool,),
    "world_size": (int,),
    "layout": (dict,),
    "config_fingerprint": (str, type(None)),
    "metadata": (dict,),
    "timing": (dict,),
    "writer": (dict,),
    "versions": (dict,),
    _SELF_HASH_FIELD: (str,),
}
_V3_FIELDS = {"shape": (str,), "alias_of": (str, type(None))}


def parse_manifest(data: bytes, *, where: str) -> Manifest:
    """Parse and check manifest bytes read from ``where`` (used in errors)."""
    body = _load_json(data, where)
    version = body.get("format_version")
    if body.get("format") != FORMAT_NAME:
        raise ManifestError(where, f"manifest format is {body.get('format')!r}, not {FORMAT_NAME!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version not in HASH_ALGORITHMS:
        readable = ", ".join(map(str, HASH_ALGORITHMS))
        raise ManifestError(where, f"manifest format version {version!r} is not supported (this ckptmgr reads "
                                   f"{readable})", hint="upgrade ckptmgr")
    _check_fields(body, where, version)
    if body["hash_algorithm"] != HASH_ALGORITHMS[version]:
        raise ManifestError(where, f"unknown hash algorithm {body['hash_algorithm']!r} for format version {version}")
    claimed = body.pop(_SELF_HASH_FIELD)
    if digest_bytes(_canonical(body)) != claimed:
        raise ManifestError(where, "manifest self-hash mismatch (torn or edited manifest)")
    files = tuple(_parse_file_entry(entry, where) for entry in body["files"])
    if len({f.path for f in files}) != len(files):
        raise ManifestError(where, "manifest lists a file twice")
    shape = body.get("shape", "directory")
    _check_values(body, where, shape)
    _check_shape(body, files, shape, where)
    _check_layout(body["layout"], {f.path for f in files}, where)
    return Manifest(
        name=body["name"], step=body["step"], epoch=body["epoch"], sequence=body["sequence"], kind=body["kind"],
        load_path=body["load_path"], files=files, created_unix=float(body["created_unix"]), shape=shape,
        epoch_end=body["epoch_end"], world_size=body["world_size"], layout=body["layout"],
        config_fingerprint=body["config_fingerprint"], metadata=body["metadata"], timing=body["timing"],
        writer=body["writer"], versions=body["versions"], alias_of=body.get("alias_of"), format_version=version,
    )


def _load_json(data: bytes, where: str) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(where, f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    _check_depth(data, where)
    try:
        body = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError(where, f"manifest is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(body, dict):
        raise ManifestError(where, "manifest is not a JSON object")
    return body


def _check_depth(data: bytes, where: str) -> None:
    """Refuse deep nesting before the JSON decoder (or anything after it) recurses into it."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return
    depth = 0
    in_string = False
    escaped_at = -1  # the position of a character a backslash escapes
    for match in _STRUCTURE.finditer(data):
        token, position = match.group(), match.start()
        if position == escaped_at:
            continue
        if in_string:
            if token == b"\\":
                escaped_at = position + 1
            elif token == b'"':
                in_string = False
        elif token == b'"':
            in_string = True
        elif token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise ManifestError(where, f"manifest nests deeper than {MAX_DEPTH} levels")
        elif token in (b"]", b"}"):
            depth -= 1


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_fields(body: dict[str, Any], where: str, version: int) -> None:
    expected = dict(_FIELDS, **(_V3_FIELDS if version >= 3 else {}))
    unknown = sorted(set(body) - set(expected))
    if unknown:
        raise ManifestError(where, f"manifest has unknown fields {unknown}")
    for name, types in expected.items():
        if name not in body:
            raise ManifestError(where, f"manifest lacks field {name!r}")
        value = body[name]
        # bool is an int in Python; only accept it where bool is meant.
        if isinstance(value, bool) and bool not in types:
            raise ManifestError(where, f"manifest field {name!r} has type bool")
        if not isinstance(value, types):
            raise ManifestError(where, f"manifest field {name!r} has type {type(value).__name__}")
    if len(body["files"]) > MAX_FILES:
        raise ManifestError(where, f"manifest lists {len(body['files'])} files, over the {MAX_FILES} limit")


def _check_values(body: dict[str, Any], where: str, shape: str) -> None:
    """Ranges and vocabularies, once every type is known to be right."""
    for number in ("step", "sequence"):
        if body[number] < 0:
            raise ManifestError(where, f"manifest field {number!r} must be a non-negative integer")
    if body["epoch"] is not None and body["epoch"] < 0:
        raise ManifestError(where, "manifest field 'epoch' must be a non-negative integer or null")
    if body["world_size"] < 1:
        raise ManifestError(where, "manifest field 'world_size' must be at least 1")
    if not math.isfinite(body["created_unix"]) or body["created_unix"] < 0:
        raise ManifestError(where, "manifest field 'created_unix' must be a finite, non-negative number")
    if body["kind"] not in KINDS:
        raise ManifestError(where, f"manifest kind {body['kind']!r} is not one of {', '.join(KINDS)}")
    if shape not in SHAPES:
        raise ManifestError(where, f"manifest shape {shape!r} is not one of {', '.join(SHAPES)}")
    if body["format_version"] >= 3:
        for key in ("name", "alias_of"):
            problem = None if body[key] is None else check_checkpoint_name(body[key])
            if problem is not None:
                raise ManifestError(where, f"manifest {key}: {problem}")
    for key, value in body["timing"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ManifestError(where, f"manifest timing {key!r} must be a finite number")


def _check_shape(body: dict[str, Any], files: tuple[FileEntry, ...], shape: str, where: str) -> None:
    load_path = body["load_path"]
    if shape == "file":
        if len(files) != 1 or files[0].path != body["name"] or load_path != body["name"]:
            raise ManifestError(where, "a single-file manifest lists exactly its own name as file and load path")
        return
    if load_path == ".":
        return
    _check_relative_path(load_path, where)
    if load_path not in {f.path for f in files}:
        raise ManifestError(where, f"manifest load_path {load_path!r} is not one of its files")


def _check_layout(layout: dict[str, Any], listed: set[str], where: str) -> None:
    """The sharding details that verification relies on: every shard a listed file."""
    for key in ("zero_stage", "dp_world_size"):
        value = layout.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ManifestError(where, f"manifest layout {key!r} must be a non-negative integer")
    shards = layout.get("shards")
    if shards is None:
        return
    if not isinstance(shards, dict):
        raise ManifestError(where, "manifest layout 'shards' must be an object of rank -> list of files")
    for rank, rank_files in shards.items():
        if not rank.isdigit() or not isinstance(rank_files, list):
            raise ManifestError(where, "manifest layout 'shards' must map rank numbers to lists of files")
        for path in rank_files:
            if not isinstance(path, str):
                raise ManifestError(where, f"manifest layout shard of rank {rank} is not a file path")
            if path not in listed:
                raise ManifestError(where, f"manifest layout names shard {path!r} that its files do not list")


def _parse_file_entry(entry: Any, where: str) -> FileEntry:
    if not isinstance(entry, dict) or set(entry) != {"path", "size", "xxh3_128"}:
        raise ManifestError(where, "manifest file entry must have exactly path, size, xxh3_128")
    path, size, digest = entry["path"], entry["size"], entry["xxh3_128"]
    if not isinstance(path, str) or not isinstance(digest, str):
        raise ManifestError(where, "manifest file entry has a non-string path or hash")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
        raise ManifestError(where, f"manifest file entry {path!r} has an invalid size {size!r}")
    if not _HEX32.fullmatch(digest):
        raise ManifestError(where, f"manifest file entry {path!r} has a malformed hash")
    _check_relative_path(path, where)
    if path == MANIFEST_NAME:
        raise ManifestError(where, "manifest lists itself")
    return FileEntry(path=path, size=size, xxh3_128=digest)


def _check_relative_path(path: str, where: str) -> None:
    """Refuse paths that could escape the checkpoint directory."""
    if _PLAIN_PATH.fullmatch(path):
        return
    bad = (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or posixpath.normpath(path) != path
        or any(part in ("", ".", "..") for part in path.split("/"))
    )
    if bad:
        raise ManifestError(where, f"manifest path {path!r} escapes or is not a plain relative path")
    raise ManifestError(where, f"manifest path {path!r} is not a plain relative path")
