"""Verification: is this checkpoint whole? Read-only, never unpickles.

A managed checkpoint is a directory holding payload files and a manifest. It
is valid iff the manifest parses (strictly, self-hash included), every listed
file exists as a regular file with the listed size and xxh3_128, and nothing
in the directory is a symlink. Files the manifest does not list are reported
but do not invalidate.

A legacy checkpoint (a ``torch.save`` / Lightning file or a DeepSpeed
directory written without ckptmgr) has no manifest; what can be checked is
the CRC32 torch's zip format stores for every record, which ``torch.load``
never checks.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import ManifestError, NotACheckpointError, PathNotFoundError, from_os_error
from .hashing import FileChanged, hash_files
from .manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest
from .naming import is_internal, looks_like_checkpoint

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class Status(str, enum.Enum):
    VALID = "valid"
    CORRUPT = "corrupt"
    INCOMPLETE = "incomplete"  # a directory with no manifest that is not a legacy layout
    LEGACY_OK = "legacy-ok"  # unsealed; zip CRCs check out
    LEGACY_CORRUPT = "legacy-corrupt"
    LEGACY_UNCHECKED = "legacy-unchecked"  # unsealed, nothing that can be checked

    @property
    def ok(self) -> bool:
        return self in (Status.VALID, Status.LEGACY_OK, Status.LEGACY_UNCHECKED)


@dataclass
class VerifyResult:
    path: str
    status: Status
    problems: list[str] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    bytes_hashed: int = 0

    @property
    def valid(self) -> bool:
        return self.status is Status.VALID

    @property
    def reason(self) -> str:
        return "; ".join(self.problems) if self.problems else self.status.value


def read_manifest(checkpoint_dir: str) -> Manifest:
    """Read and parse the manifest of the checkpoint directory."""
    path = os.path.join(checkpoint_dir, MANIFEST_NAME)
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(path, "manifest is not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            data = f.read(64 * 1024 * 1024)
    except FileNotFoundError as exc:
        raise ManifestError(path, "manifest is missing") from exc
    except OSError as exc:
        raise from_os_error(path, "reading the manifest", exc) from exc
    return parse_manifest(data, where=path)


def has_manifest(path: str) -> bool:
    return os.path.lexists(os.path.join(path, MANIFEST_NAME))


def list_tree(root: str) -> tuple[dict[str, int], list[str]]:
    """Regular files under ``root`` (relative path -> size) and anything else found.

    Symlinks are never followed; they and special files land in the second list.
    """
    files: dict[str, int] = {}
    odd: list[str] = []
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as entries:
            for entry in entries:
                rel = f"{rel_dir}{entry.name}"
                if entry.is_symlink():
                    odd.append(rel)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append((rel + "/", entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files[rel] = entry.stat(follow_symlinks=False).st_size
                else:
                    odd.append(rel)
    return files, odd


def path_size(path: str) -> int:
    """Bytes on disk of a file, or of every regular file under a directory (links not followed); 0 if gone."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            return sum(list_tree(path)[0].values())
        return os.lstat(path).st_size
    except OSError:
        return 0


def verify_checkpoint(
    path: str,
    *,
    quick: bool = False,
    workers: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Verify one checkpoint (managed or legacy). Never modifies anything."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise PathNotFoundError(path, "no such checkpoint")
    if os.path.isdir(path) and has_manifest(path):
        return _verify_managed(path, quick=quick, workers=workers, on_bytes=on_bytes)
    return verify_legacy(path, quick=quick)


def _verify_managed(
    path: str, *, quick: bool, workers: int | None, on_bytes: Callable[[int], None] | None
) -> VerifyResult:
    try:
        manifest = read_manifest(path)
    except ManifestError as exc:
        return VerifyResult(path, Status.CORRUPT, [exc.message])
    try:
        present, odd = list_tree(path)
    except OSError as exc:
        return VerifyResult(path, Status.CORRUPT, [f"cannot list directory: {exc.strerror}"], manifest=manifest)
    present.pop(MANIFEST_NAME, None)
    result = VerifyResult(path, Status.VALID, manifest=manifest)
    result.problems += [f"{name}: symlink or special file inside the checkpoint" for name in sorted(odd)]
    listed = {f.path for f in manifest.files}
    result.problems += [f"{name}: shard listed in the layout but not in the manifest" for name in
                        missing_shards(manifest.layout, listed)]
    result.extra_files = sorted(set(present) - listed)
    to_hash = []
    for entry in manifest.files:
        size = present.get(entry.path)
        if size is None:
            if entry.path not in odd:
                result.problems.append(f"{entry.path}: missing")
        elif size != entry.size:
            result.problems.append(f"{entry.path}: size {size}, manifest says {entry.size}")
        else:
            to_hash.append(entry)
    if not quick and not result.problems:
        result.problems += _hash_mismatches(path, manifest, to_hash, workers, on_bytes, result)
    if result.problems:
        result.status = Status.CORRUPT
    return result


def missing_shards(layout: dict, files: set[str]) -> list[str]:
    """Shards a sharded (DeepSpeed) layout names that the file list lacks."""
    shards = layout.get("shards")
    if not isinstance(shards, dict):
        return []
    named = [f for rank_files in shards.values() if isinstance(rank_files, list) for f in rank_files]
    return sorted(f for f in named if f not in files)


def _hash_mismatches(path: str, manifest: Manifest, entries: list[FileEntry], workers: int | None,
                     on_bytes: Callable[[int], None] | None, result: VerifyResult) -> list[str]:
    files = [(os.path.join(path, entry.path), entry.size) for entry in entries]
    digests = hash_files(files, algorithm=manifest.hash_algorithm, workers=workers, on_bytes=on_bytes)
    problems = []
    for entry, digest in zip(entries, digests, strict=True):
        if isinstance(digest, FileChanged):
            problems.append(f"{entry.path}: size changed while reading")
        elif isinstance(digest, OSError):
            problems.append(f"{entry.path}: unreadable ({digest.strerror})")
        else:
            result.bytes_hashed += entry.size
            if digest != entry.xxh3_128:
                problems.append(f"{entry.path}: xxh3_128 mismatch (content differs from the manifest)")
    return problems


def verify_legacy(path: str, *, quick: bool = False) -> VerifyResult:
    """Check a checkpoint written without ckptmgr: torch zip CRC32s where present."""
    if os.path.isdir(path) and not is_deepspeed_layout(path):
        return VerifyResult(path, Status.INCOMPLETE,
                            ["directory has no manifest and no DeepSpeed layout (interrupted or damaged save)"])
    files = _legacy_payload_files(path)
    if not files:
        if os.path.isdir(path):
            return VerifyResult(path, Status.INCOMPLETE, ["DeepSpeed layout without checkpoint files"])
        raise NotACheckpointError(path, "not a checkpoint (no manifest, not a torch or DeepSpeed file)")
    problems: list[str] = []
    checked = 0
    for file in files:
        if quick:
            continue
        outcome = check_zip_crc(file)
        if outcome is None:
            continue
        if outcome == "":
            checked += 1
        else:
            problems.append(f"{os.path.relpath(file, path) if file != path else os.path.basename(file)}: {outcome}")
    if problems:
        return VerifyResult(path, Status.LEGACY_CORRUPT, problems)
    status = Status.LEGACY_OK if checked else Status.LEGACY_UNCHECKED
    note = [] if checked else ["legacy checkpoint without zip records: nothing to check"]
    return VerifyResult(path, status, note if not quick else [])


def is_deepspeed_layout(path: str) -> bool:
    """DeepSpeed's own directory layout (plain ``dir/<tag>/`` or Lightning's ``X.ckpt/checkpoint/``)."""
    if os.path.isfile(os.path.join(path, "latest")) or os.path.isdir(os.path.join(path, "checkpoint")):
        return True
    try:
        return any(name.startswith("mp_rank_") and name.endswith("_model_states.pt") for name in os.listdir(path))
    except OSError:
        return False


def _legacy_payload_files(path: str) -> list[str]:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        is_torch_like = head == ZIP_MAGIC or head[:1] == b"\x80" or path.endswith(LEGACY_SUFFIXES)
        return [path] if is_torch_like else []
    if not os.path.isdir(path):
        return []
    files, _ = list_tree(path)
    return [os.path.join(path, rel) for rel in sorted(files) if rel.endswith(LEGACY_SUFFIXES)]


def check_zip_crc(path: str) -> str | None:
    """Check every record's CRC32 in a torch zip checkpoint.

    Returns ``""`` when all records check out, a problem description when
    they do not, and ``None`` when the file is not a zip (old pickle format).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if head != ZIP_MAGIC:
        return None if head[:1] == b"\x80" else "not a torch zip file (torn or foreign)"
    import zipfile  # here, not at the top: the CLI's read-only commands start faster without it

    try:
        with zipfile.ZipFile(path) as archive:
            records = [info for info in archive.infolist() if info.file_size > 0]
            if records and all(info.CRC == 0 for info in records):
                return None  # written without CRC32s (torch's crc32 option off, as ckptmgr saves): nothing to check
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        return f"zip structure broken ({exc})"
    except Exception as exc:  # zipfile raises assorted errors on hostile input
        return f"zip structure broken ({exc.__class__.__name__})"
    return "" if bad is None else f"CRC32 mismatch in record {bad!r}"


def candidate_names(run_dir: str) -> Iterable[str]:
    """Entries of a run directory that could be checkpoints (internal names excluded)."""
    with os.scandir(run_dir) as entries:
        for entry in entries:
            if is_internal(entry.name):
                continue
            if looks_like_checkpoint(entry.name) or (
                entry.is_dir(follow_symlinks=False) and has_manifest(entry.path)
            ):
                yield entry.name
