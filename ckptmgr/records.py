"""Commit records: the manifests in a run directory's ``.ckptmgr/manifests/``. Read-only.

Format 3 keeps every checkpoint's manifest out of the user's sight, as one
file per commit named ``<stem>.<token>.json`` (see naming.py). A checkpoint
``NAME`` is valid iff one of the records naming it matches the bytes at
``RUN/NAME``; a run may briefly hold several records for one name (saving
over an existing name publishes the new record before the new bytes take the
name, see commit.py), and readers pick the one the bytes match.

A record that cannot be read or parsed is kept with its problem, so that the
checkpoint it belongs to is reported corrupt rather than silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .errors import CkptMgrError, ManifestError
from .manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from .naming import MANIFESTS_DIR, RECORD_SUFFIX, STAGING_DIR, split_internal
from .storage import LOCAL_READER, Reader


@dataclass(frozen=True)
class Record:
    path: str
    stem: str
    token: str
    manifest: Manifest | None
    problem: str | None = None  # why it does not parse (None when it does)
    pending: bool = False  # its save's staging entry is still there: written, never published
    unreadable: bool = False  # the read failed (permission, I/O): not known to be corrupt

    @property
    def filename(self) -> str:
        return os.path.basename(self.path)


def records_dir(run_dir: str) -> str:
    return os.path.join(run_dir, MANIFESTS_DIR)


def read_records(run_dir: str, reader: Reader = LOCAL_READER, *, include_pending: bool = False) -> list[Record]:
    """The commit records of ``run_dir`` (none when the directory has no records area).

    A record whose save still has its staging entry (``<base>`` in ``.ckptmgr/staging/``) was written but
    never published (a crash between the two); it is left out unless ``include_pending``.
    Raises OSError only when the records area itself cannot be listed.
    """
    directory = records_dir(run_dir)
    try:
        with os.scandir(directory) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(RECORD_SUFFIX))
    except (FileNotFoundError, NotADirectoryError):
        return []
    staging_dir = os.path.join(run_dir, STAGING_DIR)
    staged = {n for n in _listdir(staging_dir) if _holds_a_payload(os.path.join(staging_dir, n))} if names else set()
    records = []
    for name in names:
        if split_internal(name) is None:
            continue
        pending = name[: -len(RECORD_SUFFIX)] in staged
        if pending and not include_pending:
            continue
        record = read_record(os.path.join(directory, name), reader)
        records.append(replace(record, pending=True) if pending else record)
    return records


def _holds_a_payload(path: str) -> bool:
    """A staging entry that could be an unpublished save's payload: a file, or a directory with files in it.

    (A record is written only after its payload is complete; an empty directory left behind, as some
    Volumes do when a directory is renamed away, is no payload.)"""
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            return any(files for _, _, files in os.walk(path))
        except OSError:
            return True
    return os.path.lexists(path)


def _listdir(path: str) -> set[str]:
    try:
        return set(os.listdir(path))
    except OSError:
        return set()


def read_record(path: str, reader: Reader = LOCAL_READER) -> Record:
    parts = split_internal(os.path.basename(path))
    stem, token = parts if parts is not None else (os.path.basename(path), "")
    try:
        data = reader.read_small(path, MAX_MANIFEST_BYTES + 1)
        return Record(path, stem, token, parse_manifest(data, where=path))
    except ManifestError as exc:
        return Record(path, stem, token, None, exc.message)
    except CkptMgrError as exc:
        return Record(path, stem, token, None, exc.message)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        return Record(path, stem, token, None, f"commit record unreadable ({reason})", unreadable=True)


def newest_first(records: list[Record]) -> list[Record]:
    """Parsed records, highest commit sequence first."""
    parsed = [r for r in records if r.manifest is not None]
    return sorted(parsed, key=lambda r: (r.manifest.sequence, r.token), reverse=True)  # type: ignore[union-attr]


__all__ = ["ManifestError", "Record", "newest_first", "read_record", "read_records", "records_dir"]
