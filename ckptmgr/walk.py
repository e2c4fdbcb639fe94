"""The volume doctor: find every run and checkpoint under a root, and say what is wrong.

Read-only and never unpickles. A *run directory* is any directory holding
checkpoint candidates (managed or legacy) or ckptmgr state; each of its
checkpoints is classified by the same classifier as ``ckptmgr list``
(:func:`ckptmgr.catalog.inspect`), and leftovers of crashes are reported:

==========================  ===================================================
status                      meaning
==========================  ===================================================
``valid``                   a commit record matches (``--quick``: sizes only)
``corrupt``                 which file, which check
``unreadable``              a read failed (permission denied, I/O error)
``incomplete``              a directory without manifest (interrupted save)
``legacy-ok`` / ``-corrupt``  unsealed torch/Lightning/DeepSpeed, CRC and layout checks
``legacy-unchecked``        unsealed, nothing to check (no zip CRC32s)
``alias``                   a symlink ``last`` (``bad-alias``: dangling, outside the run, itself)
==========================  ===================================================

Leftovers: ``staging`` (a save a crash interrupted), ``aside`` (a replaced
directory not yet removed or rolled back), ``trash`` (a deletion a crash
interrupted), ``sealed-original`` and ``legacy-staging``/``legacy-trash``
(format-2 leftovers), ``quarantined`` (moved aside by a writer; informational).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import catalog
from .catalog import check_run_dir
from .errors import CkptMgrError, from_os_error
from .journal import read_events
from .naming import (
    ASIDE_DIR,
    LEGACY_STAGING_PREFIX,
    LEGACY_TRASH_PREFIX,
    QUARANTINE_DIR,
    SEAL_ASIDE_PREFIX,
    STAGING_DIR,
    STATE_DIR,
    TRASH_DIR,
)
from .verify import has_manifest, looks_like_legacy, path_size, sharded_layout

OK_STATUSES = ("valid", "legacy-ok", "legacy-unchecked", "alias")


@dataclass
class CheckpointReport:
    name: str
    status: str
    step: int | None
    epoch: int | None
    bytes: int
    created_unix: float | None
    problems: list[str] = field(default_factory=list)
    alias_of: str | None = None


@dataclass
class RunReport:
    path: str
    checkpoints: list[CheckpointReport] = field(default_factory=list)
    leftovers: list[dict[str, str]] = field(default_factory=list)
    resume: str | None = None
    newest_valid_step: int | None = None
    total_bytes: int = 0
    last_commit_unix: float | None = None
    invocations: int = 0
    error: str | None = None  # the run could not be read at all

    @property
    def problems(self) -> int:
        bad = sum(c.status not in OK_STATUSES for c in self.checkpoints)
        return bad + sum(1 for item in self.leftovers if item["kind"] != "quarantined") + (self.error is not None)

    def as_dict(self) -> dict[str, Any]:
        age = None if self.last_commit_unix is None else round(time.time() - self.last_commit_unix, 1)
        return {"path": self.path, "resume": self.resume, "newest_valid_step": self.newest_valid_step,
                "total_bytes": self.total_bytes, "checkpoint_count": sum(c.status != "alias" for c in self.checkpoints),
                "last_commit_unix": self.last_commit_unix, "last_commit_age_s": age, "invocations": self.invocations,
                "problems": self.problems, "error": self.error, "checkpoints": [vars(c) for c in self.checkpoints],
                "leftovers": self.leftovers}


def find_runs(root: str) -> tuple[list[str], list[dict[str, str]]]:
    """Every run directory under ``root`` (``root`` itself included), without following links,
    and the directories that could not be read (each may hold a run: reported, never skipped silently)."""
    check_run_dir(root)
    runs, unreadable, stack = [], [], [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            if directory == root:
                raise from_os_error(root, "listing", exc) from exc
            unreadable.append({"path": directory, "kind": "unreadable-directory",
                               "reason": from_os_error(directory, "listing", exc).message})
            continue
        names = [e.name for e in entries]
        is_run = STATE_DIR in names or any(looks_like_legacy(e.path, e.name) for e in entries)
        if is_run:
            runs.append(directory)
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            if has_manifest(entry.path) or sharded_layout(entry.path):
                continue  # a checkpoint: a unit, not a tree to search
            if is_run and looks_like_legacy(entry.path, entry.name):
                continue  # a (damaged) checkpoint of this run, reported with it
            stack.append(entry.path)
    return sorted(runs), unreadable


def inspect_run(run_dir: str, *, quick: bool, on_bytes: Callable[[int], None] | None = None) -> RunReport:
    report = RunReport(run_dir)
    try:
        candidates, pick = catalog.inspect(run_dir, quick=quick, on_bytes=on_bytes)
    except CkptMgrError as exc:
        report.error = exc.message
        return report
    seen_inodes: set[tuple[int, int]] = set()
    for c in candidates:
        size = _unique_size(c.path, seen_inodes) if c.form != catalog.ALIAS else 0
        m = c.verified_manifest
        report.checkpoints.append(CheckpointReport(c.name, c.status or "", c.step, c.epoch, size,
                                                   m.created_unix if m else None, list(c.problems),
                                                   alias_of=c.alias_of or (m.alias_of if m else None)))
        report.total_bytes += size
        if m is not None and c.status == "valid":
            report.last_commit_unix = max(report.last_commit_unix or 0.0, m.created_unix)
    if pick is not None:
        report.resume, report.newest_valid_step = pick.name, pick.step
    report.leftovers = _leftovers(run_dir)
    events = read_events(run_dir)
    report.invocations = len({str(e.get("invocation")) for e in events if e["event"] == "open"})
    return report


def _unique_size(path: str, seen: set[tuple[int, int]]) -> int:
    """Bytes on disk, counting a hard-linked file once (the `last` copy shares its target's bytes)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if os.path.isdir(path) and not os.path.islink(path):
        total = 0
        for directory, _, files in os.walk(path):
            for name in files:
                total += _unique_size(os.path.join(directory, name), seen)
        return total
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return 0
    seen.add(key)
    return st.st_size


def _leftovers(run_dir: str) -> list[dict[str, str]]:
    found = []
    for kind, area in (("staging", STAGING_DIR), ("aside", ASIDE_DIR), ("trash", TRASH_DIR)):
        found += [{"path": os.path.join(run_dir, area, n), "kind": kind} for n in _listdir(os.path.join(run_dir, area))]
    for name in _listdir(run_dir):
        kind = ("legacy-staging" if name.startswith(LEGACY_STAGING_PREFIX) else
                "legacy-trash" if name.startswith(LEGACY_TRASH_PREFIX) else
                "sealed-original" if name.startswith(SEAL_ASIDE_PREFIX) else None)
        if kind:
            found.append({"path": os.path.join(run_dir, name), "kind": kind})
    quarantine = os.path.join(run_dir, QUARANTINE_DIR)
    found += [{"path": os.path.join(quarantine, n), "kind": "quarantined"} for n in _listdir(quarantine)]
    return sorted(found, key=lambda item: item["path"])


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def walk(root: str, *, quick: bool = False, on_bytes: Callable[[int], None] | None = None) -> list[RunReport]:
    runs, unreadable = find_runs(root)
    reports = [inspect_run(run, quick=quick, on_bytes=on_bytes) for run in runs]
    return reports + [RunReport(item["path"], error=item["reason"]) for item in unreadable]


def estimated_bytes(runs: list[str]) -> int:
    """What a full walk will hash: the sizes the commit records give."""
    total = 0
    for run in runs:
        try:
            candidates = catalog.scan(run)
        except CkptMgrError:
            continue
        total += sum(c.manifest.total_bytes for c in candidates if c.manifest is not None and c.form != catalog.ALIAS)
    return total


__all__ = ["CheckpointReport", "RunReport", "estimated_bytes", "find_runs", "inspect_run", "path_size", "walk"]
