"""journal: appends are whole lines, readers keep only well-formed events, and the file stays bounded."""

from __future__ import annotations

import json
import os

from ckptmgr import journal
from ckptmgr.journal import append_event, journal_path, read_events


def test_append_and_read_back(tmp_path):
    run_dir = str(tmp_path)
    append_event(run_dir, "open", invocation="a", pid=1)
    append_event(run_dir, "save", invocation="a", step=5, seconds=0.5)
    events = read_events(run_dir)
    assert [e["event"] for e in events] == ["open", "save"] and events[1]["step"] == 5


def test_torn_and_foreign_lines_are_skipped(tmp_path):
    run_dir = str(tmp_path)
    append_event(run_dir, "open", invocation="a")
    with open(journal_path(run_dir), "a") as f:
        f.write('{"event": "save", "unix": 1.5, "step": true}\n')  # a bool is not a step
        f.write("not json\n")
        f.write('{"event": "save", "unix": 2')  # torn
    assert [e["event"] for e in read_events(run_dir)] == ["open"]


def test_the_journal_is_bounded(tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    monkeypatch.setattr(journal, "MAX_BYTES", 4000)
    monkeypatch.setattr(journal, "KEEP_LINES", 10)
    for i in range(200):
        append_event(run_dir, "save", invocation="a", step=i)
    assert os.path.getsize(journal_path(run_dir)) <= 4000 + 200
    steps = [e["step"] for e in read_events(run_dir)]
    assert steps == sorted(steps) and steps[-1] == 199


def test_a_journal_that_cannot_be_written_never_fails_the_caller(tmp_path, caplog):
    run_dir = str(tmp_path)
    os.makedirs(journal_path(run_dir))  # a directory where the file belongs
    append_event(run_dir, "open", invocation="a")
    assert "could not append to the run journal" in caplog.text
    assert read_events(run_dir) == []
    assert json.dumps(read_events(run_dir)) == "[]"
