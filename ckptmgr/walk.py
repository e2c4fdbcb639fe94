"""The volume doctor: find every run and checkpoint under a root, and say what is wrong.

Read-only and never unpickles. A *run directory* is any directory holding
checkpoint candidates (managed or legacy) or ckptmgr state; each of its
checkpoints is classified, and leftovers of crashes are reported:

==========================  ===================================================
kind                        meaning
==========================  ===================================================
``valid``                   manifest verifies (``--quick``: sizes only)
``corrupt``                 which file, which check
``incomplete``              a directory without manifest (interrupted save)
``legacy-ok`` / ``-corrupt``  unsealed torch/Lightning/DeepSpeed, zip CRC result
``legacy-unchecked``        unsealed, old pickle format: nothing to check
``staging`` (leftover)      a save a crash interrupted
``trash`` (leftover)        a deletion a crash interrupted
``sealed-original``         a file `ckptmgr seal` moved aside and did not finish
``quarantined``             a corrupt checkpoint moved aside by a writer
``dangling-alias``          ``last`` pointing at nothing
==========================  ===================================================
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import catalog
from .errors import PathNotFoundError, from_os_error
from .journal import read_events
from .naming import QUARANTINE_DIR, SEAL_ASIDE_PREFIX, STATE_DIR, is_staging, is_trash, looks_like_checkpoint
from .verify import Status, has_manifest, is_deepspeed_layout, path_size, verify_checkpoint


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

    @property
    def problems(self) -> int:
        bad = sum(c.status not in ("valid", "legacy-ok", "legacy-unchecked", "alias") for c in self.checkpoints)
        return bad + sum(1 for item in self.leftovers if item["kind"] != "quarantined")

    def as_dict(self) -> dict[str, Any]:
        age = None if self.last_commit_unix is None else round(time.time() - self.last_commit_unix, 1)
        return {"path": self.path, "resume": self.resume, "newest_valid_step": self.newest_valid_step,
                "total_bytes": self.total_bytes, "checkpoint_count": sum(c.status != "alias" for c in self.checkpoints),
                "last_commit_unix": self.last_commit_unix, "last_commit_age_s": age, "invocations": self.invocations,
                "problems": self.problems, "checkpoints": [vars(c) for c in self.checkpoints],
                "leftovers": self.leftovers}


def find_runs(root: str) -> list[str]:
    """Every run directory under ``root`` (``root`` itself included), without following links."""
    if not os.path.isdir(root):
        if os.path.lexists(root):
            raise PathNotFoundError(root, "not a directory")
        raise PathNotFoundError(root, "no such directory")
    runs, stack = [], [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                entries = list(entries)
        except OSError as exc:
            if directory == root:
                raise from_os_error(root, "listing", exc) from exc
            continue
        names = [e.name for e in entries]
        is_run = STATE_DIR in names or any(looks_like_checkpoint(n) for n in names if not n.startswith("."))
        if is_run:
            runs.append(directory)
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            if has_manifest(entry.path) or is_deepspeed_layout(entry.path):
                continue  # a checkpoint: a unit, not a tree to search
            if is_run and looks_like_checkpoint(entry.name):
                continue  # a damaged checkpoint of this run, reported with it
            stack.append(entry.path)
    return sorted(runs)


def inspect_run(run_dir: str, *, quick: bool, on_bytes: Callable[[int], None] | None = None) -> RunReport:
    report = RunReport(run_dir)
    for candidate in catalog.scan(run_dir):
        report.checkpoints.append(_checkpoint_report(run_dir, candidate, quick, on_bytes))
    for c in report.checkpoints:
        if c.status != "alias":
            report.total_bytes += c.bytes
        if c.status == "valid" and report.resume is None:
            report.resume, report.newest_valid_step = c.name, c.step
        if c.created_unix is not None and c.status == "valid":
            report.last_commit_unix = max(report.last_commit_unix or 0.0, c.created_unix)
    report.leftovers = _leftovers(run_dir)
    events = read_events(run_dir)
    report.invocations = len({e.get("invocation") for e in events if e["event"] == "open"})
    return report


def _checkpoint_report(run_dir: str, c: catalog.Candidate, quick: bool, on_bytes) -> CheckpointReport:
    if c.alias_of is not None:
        dangling = not os.path.lexists(os.path.join(run_dir, c.alias_of))
        return CheckpointReport(c.name, "dangling-alias" if dangling else "alias", None, None, 0, None,
                                [f"points to missing {c.alias_of}"] if dangling else [], alias_of=c.alias_of)
    size = path_size(c.path)
    if c.manifest is None and not c.legacy:
        status = Status.INCOMPLETE if (c.problem or "").startswith("no manifest") else Status.CORRUPT
        return CheckpointReport(c.name, status.value, c.step, c.epoch, size, None, [c.problem or ""])
    try:
        result = verify_checkpoint(c.path, quick=quick, on_bytes=on_bytes)
    except Exception as exc:  # vanished or unreadable while walking: report, keep walking
        return CheckpointReport(c.name, Status.CORRUPT.value, c.step, c.epoch, size, None, [str(exc)])
    m = result.manifest
    return CheckpointReport(c.name, result.status.value, c.step, c.epoch, size, m.created_unix if m else None,
                            result.problems + [f"{x}: not listed in the manifest" for x in result.extra_files])


def _leftovers(run_dir: str) -> list[dict[str, str]]:
    found = []
    with os.scandir(run_dir) as entries:
        for entry in entries:
            kind = ("staging" if is_staging(entry.name) else "trash" if is_trash(entry.name) else
                    "sealed-original" if entry.name.startswith(SEAL_ASIDE_PREFIX) else None)
            if kind:
                found.append({"path": entry.path, "kind": kind})
    quarantine = os.path.join(run_dir, QUARANTINE_DIR)
    if os.path.isdir(quarantine):
        found += [{"path": os.path.join(quarantine, n), "kind": "quarantined"} for n in sorted(os.listdir(quarantine))]
    return sorted(found, key=lambda item: item["path"])


def walk(root: str, *, quick: bool = False, on_bytes: Callable[[int], None] | None = None) -> list[RunReport]:
    return [inspect_run(run, quick=quick, on_bytes=on_bytes) for run in find_runs(root)]
