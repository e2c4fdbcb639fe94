"""What a run directory holds, in resolution order. Read-only.

:func:`scan` finds the candidates: every name with a commit record (format 3),
every directory with its manifest inside (formats 1-2), symlink aliases, and
what a trainer could have written without ckptmgr (legacy, never resolved).
Stray files (a metrics ``eval-step=30.json``, a FIFO) are not candidates.
Candidates are ordered by the step and commit sequence their manifests
record, newest first; never by mtime or by name.

:func:`inspect` verifies every candidate and classifies it: the one
classification that ``ckptmgr list``, ``ckptmgr walk`` and
``CheckpointManager.checkpoints()`` all show. :func:`resolve` verifies as few
candidates as it can to find the newest one that is valid.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import CkptMgrError, ManifestError, NotACheckpointError, PathNotFoundError, from_os_error
from .manifest import Manifest
from .naming import ASIDE_DIR, TRASH_DIR, is_internal, parse_name, split_internal, stem
from .records import Record, newest_first, read_records
from .storage import LOCAL_READER, Reader
from .verify import (
    Status,
    VerifyResult,
    has_manifest,
    looks_like_legacy,
    read_manifest,
    sharded_layout,
    verify_in_dir,
    verify_legacy,
    verify_named,
)

_Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class Checkpoint:
    """A committed, verified checkpoint."""

    path: str
    manifest: Manifest

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def epoch(self) -> int | None:
        return self.manifest.epoch

    @property
    def sequence(self) -> int:
        return self.manifest.sequence

    @property
    def load_path(self) -> str:
        """The path to hand to the loader: the file itself, or the directory (or a file in it)."""
        if self.manifest.is_file or self.manifest.load_path == ".":
            return self.path
        return os.path.join(self.path, self.manifest.load_path)


# Forms of candidate (how ckptmgr knows it), see scan().
MANAGED, IN_DIR, ALIAS, LEGACY, INCOMPLETE, UNREADABLE = "managed", "in-dir", "alias", "legacy", "incomplete", \
    "unreadable"


@dataclass
class Candidate:
    """One entry of a run directory that is, or claims to be, a checkpoint."""

    path: str
    form: str
    run_dir: str = ""
    manifest: Manifest | None = None  # for ordering: the newest record, or the manifest inside
    records: list[Record] = field(default_factory=list)
    problem: str | None = None  # why it can never resolve, known before hashing
    alias_of: str | None = None  # a symlink alias's target
    result: VerifyResult | None = None
    status: str | None = None  # set by inspect()
    problems: list[str] = field(default_factory=list)  # set by inspect()

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.form != MANAGED or not self.manifest else self.manifest.name

    @property
    def legacy(self) -> bool:
        return self.form == LEGACY

    @property
    def is_alias(self) -> bool:
        return self.form == ALIAS or (self.manifest is not None and self.manifest.alias_of is not None)

    @property
    def step(self) -> int | None:
        m = self.verified_manifest or self.manifest
        return m.step if m else parse_name(self.name).step

    @property
    def epoch(self) -> int | None:
        m = self.verified_manifest or self.manifest
        return m.epoch if m else parse_name(self.name).epoch

    @property
    def verified_manifest(self) -> Manifest | None:
        return self.result.manifest if self.result is not None and self.result.valid else None

    @property
    def order_key(self) -> tuple[int, int, int]:
        m = self.verified_manifest or self.manifest
        if m is None:
            # Broken or legacy: ordered by the step in its name, so that the
            # skip is reported where the user expects the checkpoint to be.
            step = parse_name(self.name).step
            return (-1 if step is None else step, -1, 0)
        # Ties (an alias shares its target's step and sequence) prefer the real checkpoint.
        preferred = 0 if self.is_alias or parse_name(self.name).is_last else 1
        return (m.step, m.sequence, preferred)


def scan(run_dir: str, reader: Reader = LOCAL_READER) -> list[Candidate]:
    """Every candidate in ``run_dir``, newest first. Reads manifests, hashes nothing."""
    check_run_dir(run_dir)
    try:
        records = read_records(run_dir, reader)
        with os.scandir(run_dir) as it:
            entries = {e.name: e for e in it if not is_internal(e.name)}
    except OSError as exc:
        raise from_os_error(run_dir, "listing the run directory", exc) from exc
    candidates = _managed(run_dir, records, set(entries))
    for name, entry in sorted(entries.items()):
        if name not in candidates:
            found = _unmanaged(entry, reader)
            if found is not None:
                found.run_dir = run_dir
                candidates[name] = found
    return sorted(candidates.values(), key=lambda c: c.order_key, reverse=True)


def check_run_dir(run_dir: str) -> None:
    """A directory, or a one-line error: missing (exit 2), not a directory (3), unreadable (4)."""
    try:
        mode = os.stat(run_dir).st_mode
    except FileNotFoundError:
        raise PathNotFoundError(run_dir, "no such run directory") from None
    except OSError as exc:
        raise from_os_error(run_dir, "opening the run directory", exc) from exc
    if not stat.S_ISDIR(mode):
        raise NotACheckpointError(run_dir, "not a run directory (not a directory)")
    try:
        os.scandir(run_dir).close()
    except OSError as exc:
        raise from_os_error(run_dir, "listing the run directory", exc) from exc


def _managed(run_dir: str, records: list[Record], entries: set[str]) -> dict[str, Candidate]:
    """Candidates that have commit records, by name; an unparseable record joins the name of its stem."""
    by_name: dict[str, list[Record]] = {}
    for record in records:
        if record.manifest is not None:
            by_name.setdefault(record.manifest.name, []).append(record)
    stems = {stem(name): name for name in (*by_name, *entries)}
    for record in records:
        if record.manifest is None:
            by_name.setdefault(stems.get(record.stem, record.stem), []).append(record)
    deleting = {split[0] for split in map(split_internal, _listdir(os.path.join(run_dir, TRASH_DIR))) if split}
    candidates = {}
    for name, own in by_name.items():
        parsed = newest_first(own)
        path = _payload_path(run_dir, name, own)
        if stem(name) in deleting and not os.path.lexists(path):
            continue  # a deletion a crash interrupted: the name is already gone, only its records are left
        candidate = Candidate(path, MANAGED, run_dir, manifest=parsed[0].manifest if parsed else None, records=own)
        if not parsed:
            candidate.problem = "; ".join(f"{r.filename}: {r.problem}" for r in own)
            if all(r.unreadable for r in own):
                candidate.form = UNREADABLE
        candidates[name] = candidate
    return candidates


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _payload_path(run_dir: str, name: str, records: list[Record]) -> str:
    """``RUN/NAME``; or, while a directory replaced in place is set aside and the new one not yet there, the aside."""
    path = os.path.join(run_dir, name)
    if os.path.lexists(path):
        return path
    own = stem(name)
    for entry in sorted(_listdir(os.path.join(run_dir, ASIDE_DIR))):
        parts = split_internal(entry)
        if parts is not None and parts[0] == own:
            return os.path.join(run_dir, ASIDE_DIR, entry)
    return path


def _unmanaged(entry: os.DirEntry, reader: Reader) -> Candidate | None:
    path = entry.path
    if entry.is_symlink():
        try:
            return Candidate(path, ALIAS, alias_of=os.readlink(path), problem="alias (symlink)")
        except OSError as exc:
            return Candidate(path, UNREADABLE, problem=f"unreadable symlink ({exc.strerror})")
    if entry.is_dir(follow_symlinks=False):
        try:
            os.scandir(path).close()
        except OSError as exc:
            return Candidate(path, UNREADABLE, problem=from_os_error(path, "listing", exc).message)
        if has_manifest(path):
            try:
                return Candidate(path, IN_DIR, manifest=read_manifest(path, reader))
            except ManifestError as exc:
                return Candidate(path, IN_DIR, problem=exc.message)
            except CkptMgrError as exc:
                return Candidate(path, UNREADABLE, problem=exc.message)
        if not looks_like_legacy(path, entry.name):
            return None
        if sharded_layout(path) is None:
            return Candidate(path, INCOMPLETE, problem="no manifest (interrupted or damaged save)")
        return Candidate(path, LEGACY, problem="legacy checkpoint, not sealed (run `ckptmgr seal`)")
    if looks_like_legacy(path, entry.name):
        return Candidate(path, LEGACY, problem="legacy checkpoint, not sealed (run `ckptmgr seal`)")
    return None


# -- verification of one candidate ------------------------------------------------
def verify_candidate(candidate: Candidate, *, quick: bool = False, workers: int | None = None,
                     on_bytes: _Progress = None, reader: Reader = LOCAL_READER) -> VerifyResult:
    """Verify a candidate as what it is. Raises PathNotFoundError when it vanished."""
    if candidate.form == MANAGED:
        return verify_named(candidate.run_dir, candidate.name, candidate.records, quick=quick, workers=workers,
                            on_bytes=on_bytes, reader=reader, path=candidate.path)
    if not os.path.lexists(candidate.path):
        raise PathNotFoundError(candidate.path, "vanished")
    if candidate.form == IN_DIR:
        return verify_in_dir(candidate.path, quick=quick, workers=workers, on_bytes=on_bytes, reader=reader)
    return verify_legacy(candidate.path, quick=quick)


def inspect(run_dir: str, *, quick: bool = False, workers: int | None = None, on_bytes: _Progress = None,
            reader: Reader = LOCAL_READER) -> tuple[list[Candidate], Candidate | None]:
    """Every candidate verified and classified (``status``, ``problems``), and the one resolve picks."""
    inspected = []
    for candidate in scan(run_dir, reader):
        if classify(run_dir, candidate, quick=quick, workers=workers, on_bytes=on_bytes, reader=reader):
            inspected.append(candidate)
    valid = [c for c in inspected if c.status == Status.VALID.value]
    pick = max(valid, key=lambda c: c.order_key) if valid else None
    return sorted(inspected, key=lambda c: c.order_key, reverse=True), pick


def classify(run_dir: str, candidate: Candidate, *, quick: bool = False, workers: int | None = None,
             on_bytes: _Progress = None, reader: Reader = LOCAL_READER) -> bool:
    """Set ``status`` and ``problems``; False when the candidate vanished while being read."""
    if candidate.form == ALIAS:
        problem = _alias_problem(run_dir, candidate)
        candidate.status = "alias" if problem is None else "bad-alias"
        candidate.problems = [] if problem is None else [problem]
        return True
    if candidate.form in (INCOMPLETE, UNREADABLE) or (candidate.problem and candidate.form != LEGACY):
        candidate.status = {INCOMPLETE: Status.INCOMPLETE, UNREADABLE: Status.UNREADABLE}.get(
            candidate.form, Status.CORRUPT).value
        candidate.problems = [candidate.problem or ""]
        return True
    try:
        candidate.result = verify_candidate(candidate, quick=quick, workers=workers, on_bytes=on_bytes,
                                            reader=reader)
    except PathNotFoundError:
        return False
    except CkptMgrError as exc:  # a legacy entry that turned out not to be one, or unreadable
        candidate.status, candidate.problems = Status.UNREADABLE.value, [exc.message]
        return True
    candidate.status = candidate.result.status.value
    candidate.problems = candidate.result.problems + [f"{x}: not listed in the manifest"
                                                      for x in candidate.result.extra_files]
    return True


def _alias_problem(run_dir: str, candidate: Candidate) -> str | None:
    target = candidate.alias_of or ""
    if "/" in target or target in ("", ".", ".."):
        return f"points outside the run directory ({target!r})"
    if target == candidate.name:
        return "points to itself"
    if not os.path.lexists(os.path.join(run_dir, target)):
        return f"points to missing {target}"
    return None


# -- resolution ---------------------------------------------------------------------
RESCANS = 20


def resolve(run_dir: str, *, quick: bool = False, on_skip: Callable[[Candidate, str], None] | None = None,
            reader: Reader = LOCAL_READER, workers: int | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None when there is none at all.

    Candidates are verified newest first. A managed name may carry several
    records (a save over it interrupted); it is ordered by its newest record
    but counts for the record its bytes match, so the search goes on until no
    unverified candidate can be newer than the best found. Each skip is
    logged with its path and what failed; a read that fails skips that
    candidate only. A live writer may publish and rotate while we read: a
    candidate that vanishes mid-pass means newer ones exist, so the directory
    is scanned again (a bounded number of times).
    """
    for _ in range(RESCANS):
        found, vanished = _resolve_once(run_dir, quick, on_skip, reader, workers)
        if found is not None or not vanished:
            return found
    return None


def _resolve_once(run_dir: str, quick: bool, on_skip: Callable[[Candidate, str], None] | None, reader: Reader,
                  workers: int | None) -> tuple[Checkpoint | None, bool]:
    vanished = False
    best: Candidate | None = None
    for candidate in scan(run_dir, reader):
        if best is not None and candidate.order_key <= best.order_key:
            break  # nothing further down can beat what is verified
        if candidate.form == ALIAS:
            continue
        reason = candidate.problem
        if reason is None:
            try:
                candidate.result = verify_candidate(candidate, quick=quick, workers=workers, reader=reader)
            except PathNotFoundError:  # rotated away by the writer since the scan
                vanished = True
                continue
            if candidate.result.valid:
                if best is None or candidate.order_key > best.order_key:
                    best = candidate
                continue
            reason = candidate.result.reason
        if not os.path.lexists(candidate.path):
            vanished = True  # deleted while being read (rotated away): not corrupt, just gone; scan again
            if candidate.form != MANAGED:
                continue
        logging.getLogger(__name__).warning("[ckptmgr] skipping %s: %s", candidate.path, reason)
        if on_skip is not None:
            on_skip(candidate, reason)
    if best is None:
        return None, vanished
    return Checkpoint(best.path, best.result.manifest), vanished  # type: ignore[union-attr,arg-type]


def last_target(run_dir: str, alias: str) -> str | None:
    """The checkpoint name a symlink alias points to, if it is one."""
    path = os.path.join(run_dir, alias)
    if os.path.islink(path):
        return os.path.basename(os.readlink(path))
    return None

