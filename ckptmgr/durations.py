"""Durations as people write them: ``3600``, ``"90s"``, ``"45m"``, ``"23.5h"``, ``"1d"``, ``"DD:HH:MM:SS"``."""

from __future__ import annotations

import datetime as _dt
import math

from .errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | float | int | _dt.timedelta) -> float:
    """Seconds, > 0 and finite. Raises :class:`UsageError` (a ``ValueError``) naming what was given.

    >>> parse_duration("23.5h")
    84600.0
    >>> parse_duration("00:23:30:00")
    84600.0
    """
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value)
    else:
        raise UsageError(None, f"a duration is a number of seconds or text such as '45m', got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(None, f"a duration must be positive and finite, got {value!r}")
    return seconds


def _parse_text(value: str) -> float:
    text = value.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 4:
                raise ValueError
            days, hours, minutes, secs = parts
            return ((days * 24 + hours) * 60 + minutes) * 60 + secs
        scale = _UNITS.get(text[-1:].lower())
        return float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise UsageError(None, f"cannot read duration {value!r} (examples: 3600, 90s, 45m, 23.5h, 1d, "
                               "00:23:30:00)") from None
