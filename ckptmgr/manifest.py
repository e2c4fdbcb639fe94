"""The manifest: what a committed checkpoint holds, and proof that it is whole.

The manifest is a JSON document written last into a checkpoint directory
(``MANIFEST_NAME``). It lists every payload file with its size and xxh3_128,
and ends with a hash of its own canonical encoding so that a torn or edited
manifest never parses. The format is specified in docs/FORMAT.md; this module
is its only reader and writer. Parsing is strict: an unknown version, a
missing field, an unknown field or a wrong type is a :class:`ManifestError`,
never a silent default.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ManifestError
from .hashing import CHUNKED, PLAIN, digest_bytes

MANIFEST_NAME = "ckptmgr-manifest.json"
FORMAT_NAME = "ckptmgr"
FORMAT_VERSION = 2  # what writers produce
# Each version's file digest (see hashing.py); readers accept every version listed here.
HASH_ALGORITHMS = {1: PLAIN, 2: CHUNKED}
# A manifest larger than this is hostile or broken; it is refused unread.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_FILES = 200_000
MAX_FILE_SIZE = 1 << 50  # 1 PiB: larger sizes are absurd, not big

_SELF_HASH_FIELD = "manifest_xxh3_128"
_HEX32 = re.compile(r"[0-9a-f]{32}")
# A plain relative POSIX path: no leading "/", no empty, "." or ".." component, no backslash or NUL.
_PLAIN_PATH = re.compile(r"(?!/)(?:(?!\.{1,2}(?:/|$))[^/\\\x00]+/)*(?!\.{1,2}$)[^/\\\x00]+")


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    path: str
    size: int
    xxh3_128: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """One checkpoint's manifest (see docs/FORMAT.md; versions 1 and 2 differ only in ``hash_algorithm``)."""

    name: str
    step: int
    epoch: int | None
    sequence: int
    kind: str
    load_path: str
    files: tuple[FileEntry, ...]
    created_unix: float
    epoch_end: bool = False
    world_size: int = 1
    layout: dict[str, Any] = field(default_factory=dict)
    config_fingerprint: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    writer: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    hash_algorithm: str = CHUNKED

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json_bytes(self) -> bytes:
        """Canonical encoding, self-hash included."""
        body = _body_dict(self)
        body[_SELF_HASH_FIELD] = digest_bytes(_canonical(body))
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def _body_dict(manifest: Manifest) -> dict[str, Any]:
    body = asdict(manifest)
    body["files"] = [asdict(f) for f in manifest.files]
    body["format"] = FORMAT_NAME
    body["format_version"] = next(v for v, a in HASH_ALGORITHMS.items() if a == manifest.hash_algorithm)
    return body


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# field name -> (accepted types, required)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "format_version": ((int,), True),
    "hash_algorithm": ((str,), True),
    "name": ((str,), True),
    "step": ((int,), True),
    "epoch": ((int, type(None)), True),
    "sequence": ((int,), True),
    "kind": ((str,), True),
    "load_path": ((str,), True),
    "files": ((list,), True),
    "created_unix": ((float, int), True),
    "epoch_end": ((bool,), True),
    "world_size": ((int,), True),
    "layout": ((dict,), True),
    "config_fingerprint": ((str, type(None)), True),
    "metadata": ((dict,), True),
    "timing": ((dict,), True),
    "writer": ((dict,), True),
    "versions": ((dict,), True),
    _SELF_HASH_FIELD: ((str,), True),
}


def parse_manifest(data: bytes, *, where: str) -> Manifest:
    """Parse and check manifest bytes read from ``where`` (used in errors)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(where, f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(where, f"manifest is not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(body, dict):
        raise ManifestError(where, "manifest is not a JSON object")
    _check_fields(body, where)
    if body["format"] != FORMAT_NAME:
        raise ManifestError(where, f"manifest format is {body['format']!r}, not {FORMAT_NAME!r}")
    version = body["format_version"]
    if version not in HASH_ALGORITHMS:
        readable = ", ".join(map(str, HASH_ALGORITHMS))
        raise ManifestError(where, f"manifest format version {version} is not supported (this ckptmgr reads "
                                   f"{readable})", hint="upgrade ckptmgr")
    if body["hash_algorithm"] != HASH_ALGORITHMS[version]:
        raise ManifestError(where, f"unknown hash algorithm {body['hash_algorithm']!r} for format version {version}")
    claimed = body.pop(_SELF_HASH_FIELD)
    if digest_bytes(_canonical(body)) != claimed:
        raise ManifestError(where, "manifest self-hash mismatch (torn or edited manifest)")
    files = tuple(_parse_file_entry(entry, where) for entry in body["files"])
    if len({f.path for f in files}) != len(files):
        raise ManifestError(where, "manifest lists a file twice")
    _check_relative_path(body["load_path"], where, allow_dot=True)
    for number in ("step", "sequence", "world_size"):
        if body[number] < 0 or isinstance(body[number], bool):
            raise ManifestError(where, f"manifest field {number!r} must be a non-negative integer")
    return Manifest(
        name=body["name"],
        step=body["step"],
        epoch=body["epoch"],
        sequence=body["sequence"],
        kind=body["kind"],
        load_path=body["load_path"],
        files=files,
        created_unix=float(body["created_unix"]),
        epoch_end=body["epoch_end"],
        world_size=body["world_size"],
        layout=body["layout"],
        config_fingerprint=body["config_fingerprint"],
        metadata=body["metadata"],
        timing=body["timing"],
        writer=body["writer"],
        versions=body["versions"],
        hash_algorithm=body["hash_algorithm"],
    )


def _check_fields(body: dict[str, Any], where: str) -> None:
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise ManifestError(where, f"manifest has unknown fields {unknown}")
    for name, (types, required) in _FIELDS.items():
        if name not in body:
            if required:
                raise ManifestError(where, f"manifest lacks field {name!r}")
            continue
        value = body[name]
        # bool is an int in Python; only accept it where bool is meant.
        if isinstance(value, bool) and bool not in types:
            raise ManifestError(where, f"manifest field {name!r} has type bool")
        if not isinstance(value, types):
            raise ManifestError(where, f"manifest field {name!r} has type {type(value).__name__}")
    if len(body["files"]) > MAX_FILES:
        raise ManifestError(where, f"manifest lists {len(body['files'])} files, over the {MAX_FILES} limit")


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
    _check_relative_path(path, where, allow_dot=False)
    if path == MANIFEST_NAME:
        raise ManifestError(where, "manifest lists itself")
    return FileEntry(path=path, size=size, xxh3_128=digest)


def _check_relative_path(path: str, where: str, *, allow_dot: bool) -> None:
    """Refuse paths that could escape the checkpoint directory."""
    if allow_dot and path == ".":
        return
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
