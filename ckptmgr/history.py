"""What the run journal says about a run: invocations, speed, and how long is left.

Pure functions over the journal's events (see docs/FORMAT.md). Seconds per
step are measured between consecutive saves of one invocation, so they include
the time spent saving; an estimate needs at least two saves in one invocation
and says so when it has fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Invocation:
    id: str
    started_unix: float
    saves: list[dict[str, Any]] = field(default_factory=list)
    ended_unix: float | None = None  # a `close` event: a graceful end
    last_event_unix: float = 0.0

    @property
    def graceful(self) -> bool:
        return self.ended_unix is not None

    @property
    def first_step(self) -> int | None:
        return self.saves[0]["step"] if self.saves else None

    @property
    def last_save(self) -> dict[str, Any] | None:
        return self.saves[-1] if self.saves else None

    @property
    def lost_seconds(self) -> float:
        """Work done after the last save of this invocation: lost when it ended (a lower bound if killed)."""
        end = self.ended_unix or self.last_event_unix
        last = self.last_save["unix"] if self.saves else self.started_unix
        return max(0.0, end - last)


def invocations(events: list[dict[str, Any]]) -> list[Invocation]:
    runs: dict[str, Invocation] = {}
    order: list[str] = []
    for event in events:
        key = str(event.get("invocation"))
        if event["event"] == "open" or key not in runs:
            if key not in runs:
                runs[key] = Invocation(key, event["unix"])
                order.append(key)
        inv = runs[key]
        inv.last_event_unix = max(inv.last_event_unix, event["unix"])
        if event["event"] == "save" and isinstance(event.get("step"), int):
            inv.saves.append(event)
        elif event["event"] == "close":
            inv.ended_unix = event["unix"]
    return [runs[k] for k in order]


@dataclass
class Estimate:
    seconds_per_step: float | None
    save_seconds_mean: float | None
    current_step: int | None
    total_steps: int | None
    time_limit_s: float
    steps_per_invocation: int | None = None
    remaining_steps: int | None = None
    remaining_seconds: float | None = None
    invocations_needed: int | None = None
    invocations_so_far: int = 0
    samples: int = 0
    note: str | None = None


def estimate(events: list[dict[str, Any]], *, total_steps: int | None, time_limit_s: float,
             current_step: int | None = None) -> Estimate:
    runs = invocations(events)
    seconds, steps, save_times = 0.0, 0, []
    for inv in runs:
        save_times += [s.get("seconds", 0.0) for s in inv.saves]
        for before, after in zip(inv.saves, inv.saves[1:], strict=False):
            if after["step"] > before["step"]:
                seconds += after["unix"] - before["unix"]
                steps += after["step"] - before["step"]
    all_saves = [s for inv in runs for s in inv.saves]
    if current_step is None and all_saves:
        current_step = max(s["step"] for s in all_saves)
    result = Estimate(seconds_per_step=seconds / steps if steps else None,
                      save_seconds_mean=sum(save_times) / len(save_times) if save_times else None,
                      current_step=current_step, total_steps=total_steps, time_limit_s=time_limit_s,
                      invocations_so_far=len(runs), samples=steps)
    if result.seconds_per_step is None:
        result.note = "not enough history: needs two saves at different steps within one invocation"
        return result
    result.steps_per_invocation = int(time_limit_s / result.seconds_per_step)
    if total_steps is not None and current_step is not None:
        result.remaining_steps = max(0, total_steps - current_step)
        result.remaining_seconds = result.remaining_steps * result.seconds_per_step
        per = max(1, result.steps_per_invocation)
        result.invocations_needed = math.ceil(result.remaining_steps / per)
    if steps < 20:
        result.note = f"based on only {steps} steps of history: a rough estimate"
    return result
