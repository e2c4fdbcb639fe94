"""The run journal: an append-only record of invocations, saves and resumes.

``.ckptmgr/journal.jsonl`` holds one JSON object per line. Appends are small
single writes followed by fsync, so a crash leaves at most one torn last line,
which readers skip. The file is bounded: past ``MAX_BYTES`` it is rewritten
(tmp + rename) keeping the newest ``KEEP_LINES`` events. ``ckptmgr estimate``
and ``ckptmgr timeline`` read it; nothing ever trusts it for resolution.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
import time
from typing import Any

from .naming import STATE_DIR
from .storage import LOCAL_READER

JOURNAL_NAME = "journal.jsonl"
MAX_BYTES = 4 * 1024 * 1024
KEEP_LINES = 5000

log = logging.getLogger(__name__)


def journal_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATE_DIR, JOURNAL_NAME)


def append_event(run_dir: str, event: str, **fields: Any) -> None:
    """Append one event. A journal failure is logged, never fails a save."""
    path = journal_path(run_dir)
    record = {"event": event, "unix": time.time(), **fields}
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # O_NONBLOCK and the check below: a FIFO or device put where the journal belongs never blocks a save.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0),
                     0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            os.write(fd, line.encode())
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > MAX_BYTES:
            _truncate(path)
    except OSError as exc:
        log.warning("[ckptmgr] %s: could not append to the run journal: %s", path, exc.strerror)


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """Every well-formed event, oldest first; torn or foreign lines are skipped."""
    try:
        raw = LOCAL_READER.read_small(journal_path(run_dir), MAX_BYTES * 2)  # regular files only, never blocks
    except OSError:
        return []
    events = []
    for line in raw.splitlines():
        if line.count(b"[") + line.count(b"{") > 16:
            continue  # no event nests; a line that does is foreign or hostile (and json would recurse into it)
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if _well_formed(record):
            events.append(record)
    return events


def _well_formed(record: Any) -> bool:
    """An event readers can use without checking types again: what history.py and timeline.py rely on."""
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return False
    unix = record.get("unix")
    if not isinstance(unix, (int, float)) or isinstance(unix, bool) or not math.isfinite(unix):
        return False
    invocation = record.get("invocation")
    if invocation is not None and not isinstance(invocation, (str, int)):
        return False
    for key in ("step", "sequence", "bytes"):
        value = record.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return False
    for key in ("seconds", "durable_seconds"):
        value = record.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            return False
    return True


def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.writelines(lines[-KEEP_LINES:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
