"""Stopping in time: a per-invocation time budget, and preemption signals.

Both decide at step boundaries, agree across ranks (any rank's reason stops
all), save through :class:`ManagedCheckpoint` when the save fits, and set
``trainer.should_stop`` so that Lightning ends the run normally.

Lightning's own ``max_time`` is cumulative across resumes (its Timer restores
the elapsed time from the checkpoint), so a "23.5 h" limit stops the second
24 h invocation almost at once. :class:`TimeBudget` measures from the start of
*this* process and keeps no state in checkpoints: every invocation gets the
whole budget.
"""

from __future__ import annotations

import datetime as _dt
import logging
import signal
import threading
import time
from typing import Any

from ..durations import parse_duration
from ..errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_SAVE_ESTIMATE_S = 5.0  # before any save was measured


def _managed_checkpoint(trainer: Any) -> Any:
    from .checkpoint import ManagedCheckpointMixin

    for callback in trainer.callbacks:
        if isinstance(callback, ManagedCheckpointMixin):
            return callback
    return None


def _agree(trainer: Any, local: bool, *, every_rank: bool = False) -> bool:
    """The same decision on every rank: True if any rank says so (or, with ``every_rank``, all do)."""
    if trainer.world_size <= 1:
        return local
    return bool(trainer.strategy.reduce_boolean_decision(local, all=every_rank))


def _predicted_save_s(trainer: Any) -> float:
    checkpoint = _managed_checkpoint(trainer)
    predicted = checkpoint.predicted_save_seconds() if checkpoint is not None else None
    return DEFAULT_SAVE_ESTIMATE_S if predicted is None else predicted


class TimeBudgetMixin:
    """Stop and save before ``budget`` seconds have passed since ``started_at`` (default: now).

    The save is started early enough to finish: the stop comes at
    ``budget - margin_s - safety * (slowest recent save)``.
    """

    def __init__(self, budget: str | float | _dt.timedelta, *, margin_s: float = 60.0, safety: float = 1.5,
                 started_at: float | None = None):
        super().__init__()
        self.budget_s = parse_duration(budget)
        if margin_s < 0 or safety < 1:
            raise UsageError(None, f"margin_s must be >= 0 and safety >= 1, got {margin_s}, {safety}")
        self.margin_s = margin_s
        self.safety = safety
        self.started_at = time.time() if started_at is None else started_at
        self.stopped = False

    def _fit_margin(self, trainer: Any) -> None:
        """A margin (plus the predicted save) as long as the budget itself would stop at once: scale it down."""
        reserved = self.margin_s + self.safety * _predicted_save_s(trainer)
        if reserved >= 0.5 * self.budget_s:
            scaled = max(0.0, 0.5 * self.budget_s - self.safety * _predicted_save_s(trainer))
            log.warning("[ckptmgr] time budget %.0f s: a margin of %.0f s plus the predicted save would leave no time "
                        "to train; using a margin of %.0f s", self.budget_s, self.margin_s, scaled)
            self.margin_s = scaled

    def seconds_left(self) -> float:
        return self.started_at + self.budget_s - time.time()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_margin(trainer)
        for callback in trainer.callbacks:
            if type(callback).__name__ == "Timer" and getattr(callback, "_duration", None):
                log.warning("[ckptmgr] Trainer(max_time=...) is cumulative across resumes; "
                            "TimeBudget gives each invocation its own budget")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        needed = self.margin_s + self.safety * _predicted_save_s(trainer)
        if not _agree(trainer, self.seconds_left() <= needed):
            return
        self.stopped = True
        checkpoint = _managed_checkpoint(trainer)
        if checkpoint is not None:
            checkpoint.save_now(trainer, reason="time budget")
        log.warning("[ckptmgr] time budget reached at step %s (%.0f s left): stopping", trainer.global_step,
                    self.seconds_left())
        trainer.should_stop = True


class PreemptionMixin:
    """Save and stop on SIGTERM / SIGINT / SIGUSR1, if the save fits the grace period.

    The signal only sets a flag; the decision is made at the next step boundary.
    A save is started only if the slowest recent save, times ``safety``, fits
    in what is left of ``grace_s``; otherwise training stops without starting
    one (the previous checkpoint stays the newest). A second SIGINT interrupts.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, *, grace_s: float = 30.0, safety: float = 1.5, signals: tuple[int, ...] | None = None):
        super().__init__()
        self.grace_s = grace_s
        self.safety = safety
        self.signals = tuple(signals or self.SIGNALS)
        self.received: int | None = None
        self.received_at: float | None = None
        self.outcome: str | None = None  # "saved" | "skipped" once handled
        self._previous: dict[int, Any] = {}

    @property
    def stop(self) -> str | None:
        """What the signal meant: ``"preempted"`` (SIGTERM, SIGINT: the platform will restart this input) or
        ``"cancelled"`` (SIGUSR1: a person stopped it); None without a signal."""
        if self.received is None:
            return None
        return "cancelled" if self.received == signal.SIGUSR1 else "preempted"

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: the user insists
        self.received, self.received_at = signum, time.monotonic()
        log.warning("[ckptmgr] received signal %s: will save (if it fits) and stop at the next step", signum)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Installed after Lightning's own handlers (registered before this hook) and restored at the end.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handler)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.outcome is not None or not _agree(trainer, self.received is not None):
            return
        elapsed = time.monotonic() - self.received_at if self.received_at is not None else 0.0
        needed = self.safety * _predicted_save_s(trainer)
        checkpoint = _managed_checkpoint(trainer)
        fits = _agree(trainer, self.received is None or elapsed + needed <= self.grace_s, every_rank=True)
        if checkpoint is not None and fits:
            checkpoint.save_now(trainer, reason=f"signal {self.received}")
            self.outcome = "saved"
        else:
            log.warning("[ckptmgr] not saving: predicted %.1f s does not fit the %.0f s grace period", needed,
                        max(0.0, self.grace_s - elapsed))
            self.outcome = "skipped"
        trainer.should_stop = True
