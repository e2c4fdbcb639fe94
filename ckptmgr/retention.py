"""Retention policies: which committed checkpoints to keep.

Each policy is a small frozen dataclass with one pure method over the list of
checkpoints ordered newest first. A checkpoint is kept if any policy keeps it.
:func:`select_for_deletion` adds the protections the invariants demand: it
only ever proposes checkpoints ordered strictly below the one just committed,
so the newest valid checkpoint and the one ``resolve()`` would pick are never
candidates, and never anything protected by name (the ``last`` target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import UsageError
from .manifest import Manifest


class RetentionPolicy(Protocol):
    def keep(self, ordered: Sequence[Manifest]) -> set[int]:
        """Return the sequences to keep, given manifests ordered newest first."""
        ...


@dataclass(frozen=True, kw_only=True)
class KeepLast:
    """The ``n`` newest checkpoints."""

    n: int

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise UsageError(None, f"keep_last must be an int >= 1, got {self.n!r}")

    def keep(self, ordered: Sequence[Manifest]) -> set[int]:
        return {m.sequence for m in ordered[: self.n]}


@dataclass(frozen=True, kw_only=True)
class KeepEveryNSteps:
    """Checkpoints whose step is a multiple of ``n`` (long-term snapshots)."""

    n: int

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise UsageError(None, f"keep_every_n_steps must be an int >= 1, got {self.n!r}")

    def keep(self, ordered: Sequence[Manifest]) -> set[int]:
        return {m.sequence for m in ordered if m.step % self.n == 0}


@dataclass(frozen=True, kw_only=True)
class KeepEpochEnds:
    """Epoch-end checkpoints: the newest ``n`` of them, or all when ``n`` is None."""

    n: int | None = None

    def __post_init__(self) -> None:
        if self.n is not None and (not _is_int(self.n) or self.n < 0):
            raise UsageError(None, f"keep_epochs must be an int >= 0 or None, got {self.n!r}")

    def keep(self, ordered: Sequence[Manifest]) -> set[int]:
        ends = [m.sequence for m in ordered if m.epoch_end]
        return set(ends if self.n is None else ends[: self.n])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def select_for_deletion(
    ordered: Sequence[Manifest],
    policies: Sequence[RetentionPolicy],
    *,
    just_committed: int,
    protected: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[Manifest]:
    """Manifests to delete, oldest first. ``ordered`` is newest first."""
    keep: set[int] = set(protected) | {just_committed}
    for policy in policies:
        keep |= policy.keep(ordered)
    position = next((i for i, m in enumerate(ordered) if m.sequence == just_committed), None)
    if position is None:
        return []
    below = ordered[position + 1 :]
    return [m for m in reversed(below) if m.sequence not in keep]
