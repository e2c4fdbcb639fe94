"""durations: what people write, in seconds; anything else a usage error naming what was given."""

from __future__ import annotations

import datetime

import pytest

from ckptmgr import UsageError
from ckptmgr.durations import parse_duration


@pytest.mark.parametrize("text, seconds", [("3600", 3600), (90, 90), (1.5, 1.5), ("90s", 90), ("45m", 2700),
                                           ("23.5h", 84600), ("1d", 86400), ("00:23:30:00", 84600),
                                           (datetime.timedelta(minutes=2), 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1:2:3", "-5m", "0", 0, float("inf"), float("nan"), True, None, [1]])
def test_bad_durations(text):
    with pytest.raises(UsageError):
        parse_duration(text)
