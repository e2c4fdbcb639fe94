"""Verification: is this checkpoint whole? Read-only, never unpickles.

Three kinds of checkpoint are checked (docs/FORMAT.md, "Where manifests live"):

- a **managed checkpoint** (format 3): the file or directory ``RUN/NAME`` and
  its commit records in ``RUN/.ckptmgr/manifests/``. It is valid iff one of
  its records matches: every listed file present as a regular file with the
  listed size and xxh3_128, nothing inside the directory a symlink. The file
  is hashed once, whatever the number of records;
- a **directory with its manifest inside** (formats 1 and 2, and ``ckptmgr
  export`` outputs), checked the same way against that manifest;
- a **legacy checkpoint** (a ``torch.save`` / Lightning file or a DeepSpeed
  directory with no record): what can be checked is the CRC32 torch's zip
  format stores per record, which ``torch.load`` never checks itself.

Every read goes through a :class:`ckptmgr.storage.Reader`; a read that fails
makes the checkpoint ``unreadable`` with the reason, never an exception.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .dcp_layout import completeness_problems, is_dcp_layout, item_crc_problems
from .dcp_layout import read_metadata as read_dcp_metadata
from .errors import CkptMgrError, ManifestError, NotACheckpointError, PathNotFoundError, from_os_error
from .hashing import FileChanged, hash_files
from .manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest
from .naming import ASIDE_DIR, is_internal, looks_like_checkpoint, split_internal, stem
from .records import Record, newest_first, read_records
from .storage import LOCAL_READER, Reader

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_Progress = Callable[[int], None] | None


class Status(str, enum.Enum):
    VALID = "valid"
    CORRUPT = "corrupt"
    UNREADABLE = "unreadable"  # a read failed (permission denied, I/O error): not known to be corrupt
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
    notes: list[str] = field(default_factory=list)
    record: Record | None = None  # the commit record that matched (format 3)

    @property
    def valid(self) -> bool:
        return self.status is Status.VALID

    @property
    def reason(self) -> str:
        return "; ".join(self.problems) if self.problems else self.status.value


# -- directory listing ----------------------------------------------------------
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


# -- manifests inside a directory (formats 1-2, exports) ---------------------------
def has_manifest(path: str) -> bool:
    return os.path.lexists(os.path.join(path, MANIFEST_NAME))


def read_manifest(checkpoint_dir: str, reader: Reader = LOCAL_READER) -> Manifest:
    """Read and parse the manifest inside ``checkpoint_dir`` (formats 1-2, exports)."""
    path = os.path.join(checkpoint_dir, MANIFEST_NAME)
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(path, "manifest is not a regular file")
        data = reader.read_small(path, 64 * 1024 * 1024)
    except FileNotFoundError as exc:
        raise ManifestError(path, "manifest is missing") from exc
    except OSError as exc:
        raise from_os_error(path, "reading the manifest", exc) from exc
    return parse_manifest(data, where=path)


# -- verification ---------------------------------------------------------------
def verify_checkpoint(path: str, *, quick: bool = False, workers: int | None = None, on_bytes: _Progress = None,
                      reader: Reader = LOCAL_READER, records: list[Record] | None = None) -> VerifyResult:
    """Verify one checkpoint (managed or legacy). Never modifies anything.

    ``records``: the run directory's commit records when the caller already
    read them (a resolve reads them once for every candidate).
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise PathNotFoundError(path, "no such checkpoint")
    run_dir, name = _run_dir_and_name(os.path.abspath(path))
    if records is None:
        try:
            records = read_records(run_dir, reader)
        except OSError:
            records = []  # the records area cannot be listed: checked as what the path itself shows
    mine = records_for(name, records)
    if mine:
        return verify_named(run_dir, name, mine, quick=quick, workers=workers, on_bytes=on_bytes, reader=reader,
                            path=path)
    if os.path.isdir(path) and not os.path.islink(path) and has_manifest(path):
        return verify_in_dir(path, quick=quick, workers=workers, on_bytes=on_bytes, reader=reader)
    result = verify_legacy(path, quick=quick)
    if os.path.isfile(path) and not os.path.islink(path):
        result.notes.append("no commit record beside it (not managed, or copied out of its run directory): "
                            "only torch's zip CRC32s were checked")
    return result


def _run_dir_and_name(path: str) -> tuple[str, str]:
    """Where a checkpoint's records are, and its name. A directory set aside while it is being replaced
    (``RUN/.ckptmgr/aside/<stem>.<token>``) keeps its records under its own name."""
    parent, entry = os.path.split(path)
    if parent.endswith(os.sep + ASIDE_DIR.replace("/", os.sep)):
        run_dir = os.path.dirname(os.path.dirname(parent))
        parts = split_internal(entry)
        if parts is not None:
            try:
                names = {r.manifest.name for r in read_records(run_dir) if r.manifest is not None}
            except OSError:
                names = set()
            return run_dir, next((n for n in sorted(names) if stem(n) == parts[0]), parts[0])
    return parent, entry


def records_for(name: str, records: Iterable[Record]) -> list[Record]:
    """The records that belong to checkpoint ``name``: those naming it, and unparseable ones of its stem."""
    own = stem(name)
    return [r for r in records if (r.manifest.name == name if r.manifest is not None else r.stem == own)]


def verify_named(run_dir: str, name: str, records: list[Record], *, quick: bool = False, workers: int | None = None,
                 on_bytes: _Progress = None, reader: Reader = LOCAL_READER, path: str | None = None) -> VerifyResult:
    """Verify the format-3 checkpoint ``RUN/NAME`` against its commit records (the newest that matches wins).

    A file replaced while it is read (a writer saving over the name) is read again, a bounded number of times.
    """
    path = path or os.path.join(run_dir, name)
    for _ in range(3):
        before = _identity(path)
        result = _verify_against_records(run_dir, path, records, quick, workers, on_bytes, reader)
        if result.valid or before is None or _identity(path) == before:
            return result
        records = records_for(name, read_records(run_dir, reader))
    return result


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _verify_against_records(run_dir: str, path: str, records: list[Record], quick: bool, workers: int | None,
                            on_bytes: _Progress, reader: Reader) -> VerifyResult:
    parsed = newest_first(records)
    broken = [r for r in records if r.manifest is None]
    if not parsed:
        status = Status.UNREADABLE if all(r.unreadable for r in broken) else Status.CORRUPT
        return VerifyResult(path, status, [f"{os.path.basename(r.path)}: {r.problem}" for r in broken])
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return VerifyResult(path, Status.CORRUPT, ["payload missing (deleted, or a save interrupted before it "
                                                   "took its name)"], manifest=parsed[0].manifest)
    except OSError as exc:
        return VerifyResult(path, Status.UNREADABLE, [f"cannot stat: {exc.strerror}"], manifest=parsed[0].manifest)
    if stat.S_ISDIR(st.st_mode):
        return _verify_directory_records(path, parsed, quick, workers, on_bytes, reader)
    if not stat.S_ISREG(st.st_mode):
        return VerifyResult(path, Status.CORRUPT, ["not a regular file (a symlink or special file under the name)"],
                            manifest=parsed[0].manifest)
    return _verify_file_records(run_dir, path, st.st_size, parsed, quick, workers, on_bytes, reader)


def _verify_file_records(run_dir: str, path: str, size: int, parsed: list[Record], quick: bool, workers: int | None,
                         on_bytes: _Progress, reader: Reader) -> VerifyResult:
    files = [r for r in parsed if r.manifest.is_file]  # type: ignore[union-attr]
    sized = [r for r in files if r.manifest.files[0].size == size]  # type: ignore[union-attr]
    newest = parsed[0].manifest
    if not sized:
        expected = files[0].manifest.files[0].size if files else None  # type: ignore[union-attr]
        problem = (f"size {size}, manifest says {expected}" if expected is not None
                   else "a file where the commit record describes a directory")
        return VerifyResult(path, Status.CORRUPT, [problem], manifest=newest)
    if quick:
        return _matched(path, sized[0], parsed, 0)
    algorithm = sized[0].manifest.hash_algorithm  # type: ignore[union-attr]
    digest = hash_files([(path, size)], algorithm=algorithm, workers=workers, on_bytes=on_bytes, reader=reader)[0]
    if isinstance(digest, OSError):
        return _read_failure(path, digest, newest)
    for record in sized:
        if record.manifest.files[0].xxh3_128 == digest:  # type: ignore[union-attr]
            return _matched(path, record, parsed, size)
    return VerifyResult(path, Status.CORRUPT, ["xxh3_128 mismatch (content differs from the manifest)"],
                        manifest=newest, bytes_hashed=size)


def _verify_directory_records(path: str, parsed: list[Record], quick: bool, workers: int | None,
                              on_bytes: _Progress, reader: Reader) -> VerifyResult:
    first: VerifyResult | None = None
    digests: dict[tuple[str, int], str | OSError] = {}
    for record in parsed:
        manifest = record.manifest
        assert manifest is not None
        if manifest.is_file:
            continue
        result = _check_tree(path, manifest, quick, workers, on_bytes, reader, digests)
        if result.valid:
            result.record = record
            result.notes += _other_records(parsed, record)
            return result
        first = first or result
    return first or VerifyResult(path, Status.CORRUPT, ["a directory where the commit record describes a file"],
                                 manifest=parsed[0].manifest)


def _matched(path: str, record: Record, parsed: list[Record], hashed: int) -> VerifyResult:
    result = VerifyResult(path, Status.VALID, manifest=record.manifest, bytes_hashed=hashed, record=record)
    result.notes += _other_records(parsed, record)
    return result


def _other_records(parsed: list[Record], matched: Record) -> list[str]:
    """Records of the same name that the bytes do not match: a save over the name that was interrupted
    (newer) or a replaced one's record not yet removed (older). The writer removes both."""
    notes = []
    for record in parsed:
        if record is matched:
            continue
        newer = record.manifest.sequence > matched.manifest.sequence  # type: ignore[union-attr]
        notes.append(f"{record.filename}: {'unpublished' if newer else 'superseded'} commit record (ignored)")
    return notes


def _read_failure(path: str, error: OSError, manifest: Manifest | None) -> VerifyResult:
    if isinstance(error, FileChanged):
        return VerifyResult(path, Status.CORRUPT, ["size changed while reading"], manifest=manifest)
    return VerifyResult(path, Status.UNREADABLE, [f"unreadable ({error.strerror or error})"], manifest=manifest)


def verify_in_dir(path: str, *, quick: bool = False, workers: int | None = None, on_bytes: _Progress = None,
                  reader: Reader = LOCAL_READER) -> VerifyResult:
    """A directory holding its own manifest: formats 1-2, and ``ckptmgr export`` outputs."""
    try:
        manifest = read_manifest(path, reader)
    except ManifestError as exc:
        return VerifyResult(path, Status.CORRUPT, [exc.message])
    except CkptMgrError as exc:
        return VerifyResult(path, Status.UNREADABLE, [exc.message])
    result = _check_tree(path, manifest, quick, workers, on_bytes, reader, {}, skip={MANIFEST_NAME})
    if result.valid and not _names_agree(manifest.name, os.path.basename(path)) and manifest.kind != "export":
        result.status = Status.CORRUPT
        result.problems.append(f"the manifest is that of {manifest.name!r} (moved or copied from another checkpoint)")
    return result


def _names_agree(recorded: str, actual: str) -> bool:
    """Format 2 published a save over an existing name as ``NAME-vN`` first, then renamed it to NAME."""
    if recorded == actual:
        return True
    base, suffix = os.path.splitext(recorded)
    head, _, version = base.rpartition("-v")
    return bool(head) and version.isdigit() and f"{head}{suffix}" == actual


def _check_tree(path: str, manifest: Manifest, quick: bool, workers: int | None, on_bytes: _Progress,
                reader: Reader, digests: dict[tuple[str, int], str | OSError],
                skip: frozenset[str] | set[str] = frozenset()) -> VerifyResult:
    """Check a directory's files against ``manifest`` (``digests`` caches hashes across records)."""
    try:
        present, odd = list_tree(path)
    except OSError as exc:
        status = Status.UNREADABLE
        return VerifyResult(path, status, [f"cannot list directory: {exc.strerror}"], manifest=manifest)
    for name in skip:
        present.pop(name, None)
    result = VerifyResult(path, Status.VALID, manifest=manifest)
    result.problems += [f"{name}: symlink or special file inside the checkpoint" for name in sorted(odd)]
    listed = {f.path for f in manifest.files}
    result.extra_files = sorted(set(present) - listed)
    to_hash: list[FileEntry] = []
    for entry in manifest.files:
        size = present.get(entry.path)
        if size is None:
            if entry.path not in odd:
                result.problems.append(f"{entry.path}: missing")
        elif size != entry.size:
            result.problems.append(f"{entry.path}: size {size}, manifest says {entry.size}")
        else:
            to_hash.append(entry)
    failed_reads = 0
    if not quick and not result.problems:
        failed_reads = _hash_mismatches(path, manifest, to_hash, workers, on_bytes, reader, digests, result)
    if result.problems:
        # Only failed reads: nothing is known to be wrong with the bytes, but they cannot be trusted now.
        result.status = Status.UNREADABLE if failed_reads == len(result.problems) else Status.CORRUPT
    return result


def _hash_mismatches(path: str, manifest: Manifest, entries: list[FileEntry], workers: int | None,
                     on_bytes: _Progress, reader: Reader, digests: dict[tuple[str, int], str | OSError],
                     result: VerifyResult) -> int:
    """Hash what is not cached yet; add a problem per mismatch to ``result``; return the number of failed reads."""
    todo = [e for e in entries if (e.path, e.size) not in digests]
    files = [(os.path.join(path, entry.path), entry.size) for entry in todo]
    fresh = hash_files(files, algorithm=manifest.hash_algorithm, workers=workers, on_bytes=on_bytes, reader=reader)
    for entry, digest in zip(todo, fresh, strict=True):
        digests[(entry.path, entry.size)] = digest
    failed_reads = 0
    for entry in entries:
        digest = digests[(entry.path, entry.size)]
        if isinstance(digest, FileChanged):
            result.problems.append(f"{entry.path}: size changed while reading")
        elif isinstance(digest, OSError):
            result.problems.append(f"{entry.path}: unreadable ({digest.strerror or digest})")
            failed_reads += 1
        else:
            result.bytes_hashed += entry.size
            if digest != entry.xxh3_128:
                result.problems.append(f"{entry.path}: xxh3_128 mismatch (content differs from the manifest)")
    return failed_reads


# -- legacy checkpoints -------------------------------------------------------------
def verify_legacy(path: str, *, quick: bool = False) -> VerifyResult:
    """Check a checkpoint written without ckptmgr: torch zip CRC32s where present."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise from_os_error(path, "reading", exc) from exc
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise NotACheckpointError(path, "not a checkpoint (a symlink or special file)")
    if stat.S_ISDIR(mode) and is_dcp_layout(path):
        return _verify_legacy_dcp(path, quick)
    if stat.S_ISDIR(mode) and not is_deepspeed_layout(path):
        return VerifyResult(path, Status.INCOMPLETE, ["directory has no manifest and no DeepSpeed or DCP layout "
                                                      "(interrupted or damaged save)"])
    files = _legacy_payload_files(path)
    if not files:
        if stat.S_ISDIR(mode):
            return VerifyResult(path, Status.INCOMPLETE, ["DeepSpeed layout without checkpoint files"])
        raise NotACheckpointError(path, "not a checkpoint (no manifest, not a torch or DeepSpeed file)")
    if stat.S_ISDIR(mode):
        missing = deepspeed_missing(path)
        if missing:
            return VerifyResult(path, Status.LEGACY_CORRUPT, [missing])
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
    note = [] if checked else ["legacy checkpoint without zip CRC32s (old pickle format, or written with torch's "
                               "CRC32 turned off): nothing to check"]
    return VerifyResult(path, status, note if not quick else [])


def _verify_legacy_dcp(path: str, quick: bool) -> VerifyResult:
    """A DCP directory written without ckptmgr: complete against its ``.metadata``, and the items' CRC32s."""
    try:
        metadata = read_dcp_metadata(path)
    except CkptMgrError as exc:
        return VerifyResult(path, Status.LEGACY_CORRUPT, [exc.message])
    problems = completeness_problems(path, metadata)
    if problems or quick:
        return VerifyResult(path, Status.LEGACY_CORRUPT if problems else Status.LEGACY_OK, problems)
    checked, problems = item_crc_problems(path, metadata)
    if problems:
        return VerifyResult(path, Status.LEGACY_CORRUPT, problems)
    if not checked:
        return VerifyResult(path, Status.LEGACY_UNCHECKED, ["DCP items without zip CRC32s: only completeness checked"])
    return VerifyResult(path, Status.LEGACY_OK)


def sharded_layout(path: str) -> str | None:
    """``"dcp"`` or ``"deepspeed"`` for a directory in one of those layouts, else None."""
    if is_dcp_layout(path):
        return "dcp"
    return "deepspeed" if is_deepspeed_layout(path) else None


def is_deepspeed_layout(path: str) -> bool:
    """DeepSpeed's own directory layout (plain ``dir/<tag>/`` or Lightning's ``X.ckpt/checkpoint/``)."""
    if os.path.isfile(os.path.join(path, "latest")) or os.path.isdir(os.path.join(path, "checkpoint")):
        return True
    try:
        return any(name.startswith("mp_rank_") and name.endswith("_model_states.pt") for name in os.listdir(path))
    except OSError:
        return False


def deepspeed_missing(path: str) -> str | None:
    """What a DeepSpeed directory lacks to be loadable: the tag ``latest`` names, or the model states file."""
    tag = "checkpoint"
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        try:
            with open(latest, encoding="utf-8", errors="replace") as f:
                tag = f.read(4096).strip()
        except OSError as exc:
            return f"latest unreadable ({exc.strerror})"
        if not tag or "/" in tag or tag in (".", ".."):
            return f"latest names no usable tag ({tag!r})"
    tag_dir = os.path.join(path, tag)
    if not os.path.isdir(tag_dir):
        if any(n.startswith("mp_rank_") for n in os.listdir(path)):
            tag_dir = path  # the tag directory itself was given
        else:
            return f"latest names tag {tag!r}, which is not there"
    try:
        names = os.listdir(tag_dir)
    except OSError as exc:
        return f"{tag}: unreadable ({exc.strerror})"
    if not any(n.startswith("mp_rank_") and n.endswith("_model_states.pt") for n in names) and not any(
            n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt") for n in names):
        return f"{tag}: no model states file (mp_rank_*_model_states.pt)"
    return None


def _legacy_payload_files(path: str) -> list[str]:
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            return [path]
        is_torch_like = head == ZIP_MAGIC or head[:1] == b"\x80" or path.endswith(LEGACY_SUFFIXES)
        return [path] if is_torch_like else []
    if not os.path.isdir(path):
        return []
    files, _ = list_tree(path)
    return [os.path.join(path, rel) for rel in sorted(files) if rel.endswith(LEGACY_SUFFIXES)]


def check_zip_crc(path: str) -> str | None:
    """Check every record's CRC32 in a torch zip checkpoint.

    Returns ``""`` when all records check out, a problem description when
    they do not, and ``None`` when there is nothing to check (the old pickle
    format, or a zip written with torch's CRC32 option off).
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


def looks_like_legacy(path: str, name: str) -> bool:
    """An entry a trainer could have written as a checkpoint: a torch-like file or a checkpoint-named directory."""
    if is_internal(name) or not looks_like_checkpoint(name):
        return False
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    if stat.S_ISDIR(mode):
        return True
    if not stat.S_ISREG(mode):
        return False
    if name.endswith(LEGACY_SUFFIXES):
        return True
    return os.path.splitext(name)[1] == ""  # "last", "step=10": a name with no extension


__all__ = ["Status", "VerifyResult", "check_zip_crc", "has_manifest", "is_deepspeed_layout", "list_tree",
           "sharded_layout",
           "path_size", "read_manifest", "records_for", "verify_checkpoint", "verify_in_dir", "verify_legacy",
           "verify_named"]
