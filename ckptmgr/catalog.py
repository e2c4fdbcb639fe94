"""What a run directory holds, in resolution order. Read-only.

Candidates are ordered by the step and commit sequence their manifests
record, newest first; never by mtime or by name. The ``last`` alias is a
hint only: a symlink alias is reported but never a candidate of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import InvalidCheckpointError, ManifestError, PathNotFoundError, from_os_error
from .manifest import Manifest
from .naming import parse_name
from .verify import (
    Status,
    VerifyResult,
    candidate_names,
    has_manifest,
    is_deepspeed_layout,
    read_manifest,
    verify_checkpoint,
)


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
        """The path to hand to the loader (a file, or the directory for DeepSpeed)."""
        if self.manifest.load_path == ".":
            return self.path
        return os.path.join(self.path, self.manifest.load_path)


@dataclass
class Candidate:
    """One entry of a run directory that is, or claims to be, a checkpoint."""

    path: str
    manifest: Manifest | None
    problem: str | None = None  # why it can never resolve, known before hashing
    alias_of: str | None = None  # set for a symlink ``last`` alias
    legacy: bool = False
    result: VerifyResult | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def step(self) -> int | None:
        return self.manifest.step if self.manifest else parse_name(self.name).step

    @property
    def epoch(self) -> int | None:
        return self.manifest.epoch if self.manifest else parse_name(self.name).epoch

    @property
    def order_key(self) -> tuple[int, int, int]:
        if self.manifest is None:
            # Broken or legacy: ordered by the step in its name, so that the
            # skip is reported where the user expects the checkpoint to be.
            step = parse_name(self.name).step
            return (-1 if step is None else step, -1, 0)
        # Ties (a hard-linked ``last`` copy shares its target's sequence) prefer the real name.
        return (self.manifest.step, self.manifest.sequence, 0 if parse_name(self.name).is_last else 1)


def scan(run_dir: str) -> list[Candidate]:
    """Every candidate in ``run_dir``, newest first. Reads manifests, hashes nothing."""
    if not os.path.isdir(run_dir):
        if os.path.lexists(run_dir):
            raise InvalidCheckpointError(run_dir, "not a directory")
        raise PathNotFoundError(run_dir, "no such run directory")
    try:
        names = sorted(candidate_names(run_dir))
    except OSError as exc:
        raise from_os_error(run_dir, "listing the run directory", exc) from exc
    candidates = [_candidate(os.path.join(run_dir, name)) for name in names]
    return sorted(candidates, key=lambda c: c.order_key, reverse=True)


def _candidate(path: str) -> Candidate:
    if os.path.islink(path):
        return Candidate(path, None, problem="alias (symlink)", alias_of=os.readlink(path))
    if os.path.isdir(path) and has_manifest(path):
        try:
            return Candidate(path, read_manifest(path))
        except (ManifestError, PathNotFoundError) as exc:
            return Candidate(path, None, problem=exc.message)
        except OSError as exc:
            return Candidate(path, None, problem=f"unreadable manifest ({exc.strerror})")
    if os.path.isdir(path) and not is_deepspeed_layout(path):
        return Candidate(path, None, problem="no manifest (interrupted or damaged save)")
    return Candidate(path, None, problem="legacy checkpoint, not sealed (run `ckptmgr seal`)", legacy=True)


def resolve(
    run_dir: str,
    *,
    quick: bool = False,
    on_skip: Callable[[Candidate, str], None] | None = None,
) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None when there is none at all.

    Candidates are verified in order and the first valid one wins; each one
    skipped is logged with its path and what failed. A live writer may publish
    and rotate while we read: a candidate that vanishes mid-pass means newer
    ones exist, so the directory is scanned again (a bounded number of times).
    """
    for _ in range(RESCANS):
        found, vanished = _resolve_once(run_dir, quick=quick, on_skip=on_skip)
        if found is not None or not vanished:
            return found
    return None


RESCANS = 20


def _resolve_once(run_dir: str, *, quick: bool, on_skip: Callable[[Candidate, str], None] | None
                  ) -> tuple[Checkpoint | None, bool]:
    vanished = False
    for candidate in scan(run_dir):
        if candidate.alias_of is not None:
            continue
        reason = candidate.problem
        if reason is None:
            try:
                candidate.result = verify_checkpoint(candidate.path, quick=quick)
            except PathNotFoundError:  # rotated away by the writer since the scan
                vanished = True
                continue
            if candidate.result.status is Status.VALID:
                return Checkpoint(candidate.path, candidate.result.manifest), vanished  # type: ignore[arg-type]
            reason = candidate.result.reason
        if not os.path.lexists(candidate.path):
            vanished = True  # deleted while being read: not corrupt, just gone
            continue
        import logging  # here: the CLI's read-only commands start faster without it

        logging.getLogger(__name__).warning("[ckptmgr] skipping %s: %s", candidate.path, reason)
        if on_skip is not None:
            on_skip(candidate, reason)
    return None, vanished


def last_target(run_dir: str, alias: str) -> str | None:
    """The checkpoint name a symlink alias points to, if it is one."""
    path = os.path.join(run_dir, alias)
    if os.path.islink(path):
        return os.path.basename(os.readlink(path))
    return None
