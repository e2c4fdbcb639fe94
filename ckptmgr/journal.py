"""The run journal: an append-only record of invocations, saves and resumes.

``.ckptmgr/journal.jsonl`` holds one JSON object per line. Appends are small
single writes followed by fsync, so a crash leaves at most one torn last line,
which readers skip. The file is bounded: past ``MAX_BYTES`` it is rewritten
(tmp + rename) keeping the newest ``KEEP_LINES`` events. ``ckptmgr estimate``
and ``ckptmgr timeline`` read it; nothing ever trusts it for resolution.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from .naming import STATE_DIR

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
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
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
        with open(journal_path(run_dir), "rb") as f:
            raw = f.read(MAX_BYTES * 2)
    except OSError:
        return []
    events = []
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        well_formed = isinstance(record, dict) and isinstance(record.get("event"), str)
        if well_formed and isinstance(record.get("unix"), (int, float)):
            events.append(record)
    return events


def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.writelines(lines[-KEEP_LINES:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
