"""Hostile input and odd files: every reader answers in one line or a report, never a traceback or a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ckptmgr import CheckpointManager
from ckptmgr.journal import journal_path
from tests.conftest import REPO, run_cli, tensor_state


def test_a_fifo_in_place_of_the_journal_blocks_nobody(make_run, run_dir, tmp_path):
    make_run()
    os.unlink(journal_path(run_dir))
    os.mkfifo(journal_path(run_dir))
    for args in (["walk", run_dir], ["estimate", run_dir, "--total-steps", "10"],
                 ["timeline", run_dir, "-o", str(tmp_path / "t.png")]):
        proc = run_cli(*args)  # run_cli's timeout would fire on a hang
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
    with CheckpointManager(run_dir) as manager:  # and a writer's save goes on (the journal is informational)
        assert manager.save(tensor_state(40), step=40).step == 40


@pytest.mark.parametrize("line", [
    '{"event": "open", "unix": 1.0, "invocation": ["a", "list"]}',
    '{"event": "save", "unix": 2.0, "invocation": "a", "step": "ten"}',
    '{"event": "save", "unix": NaN, "invocation": "a", "step": 10}',
    '{"event": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "[" * 200_000,
    '{"event": "save", "unix": 3.0, "invocation": {"x": 1}, "step": 5, "seconds": "slow"}',
])
def test_hostile_journal_lines_are_skipped(line, make_run, run_dir, tmp_path):
    make_run()
    with open(journal_path(run_dir), "a") as f:
        f.write(line + "\n")
    for args in (["walk", run_dir, "--json"], ["estimate", run_dir, "--total-steps", "100", "--json"],
                 ["timeline", run_dir, "-o", str(tmp_path / "t.svg")]):
        proc = run_cli(*args)
        assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, (args, proc.stderr[-500:])


def test_names_that_are_not_utf8_never_break_the_output(run_dir):
    """A file name that is not UTF-8 (a stray file from another system), printed to a strict UTF-8 stdout."""
    with CheckpointManager(run_dir, keep_last=None) as manager:
        manager.save(tensor_state(1), step=1)
    raw = os.path.join(os.fsencode(run_dir), b"epoch=0-step=2-\xff\xfe.ckpt")
    with open(raw, "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONIOENCODING="utf-8:strict", LC_ALL="C.UTF-8")
    for args in (["verify", run_dir], ["list", run_dir], ["walk", run_dir], ["resolve", run_dir],
                 ["list", run_dir, "--json"], ["walk", run_dir, "--json"]):
        proc = subprocess.run([sys.executable, "-m", "ckptmgr", *args], capture_output=True, text=False, env=env,
                              timeout=120)
        assert b"Traceback" not in proc.stderr, (args, proc.stderr.decode(errors="replace"))
        assert proc.returncode in (0, 1)
        assert b"\\xff" in proc.stdout or b"\\udcff" in proc.stdout or args[0] == "resolve"


def test_piped_output_is_never_cropped(run_dir):
    with CheckpointManager(run_dir, keep_last=None, last_alias=None) as manager:
        manager.save(tensor_state(1), step=120_000, epoch=7, name=f"{'long-experiment-name-' * 4}step=120000.ckpt")
    env = dict(os.environ, PYTHONPATH=REPO, COLUMNS="40")  # a narrow pipe, as in Modal's logs
    for command in ("list", "walk"):
        out = subprocess.run([sys.executable, "-m", "ckptmgr", command, run_dir], capture_output=True, text=True,
                             env=env).stdout
        assert "120000" in out and "long-experiment-name-" * 4 in out, out
    listing = subprocess.run([sys.executable, "-m", "ckptmgr", "list", run_dir], capture_output=True, text=True,
                             env=env).stdout
    assert "resume would pick" in listing and "KiB" in listing


def test_a_last_that_points_to_itself_is_reported(make_run, run_dir):
    make_run(last_alias=None)
    os.symlink("loop.ckpt", os.path.join(run_dir, "loop.ckpt"))
    data = json.loads(run_cli("walk", run_dir, "--json").stdout)
    (row,) = [c for c in data["runs"][0]["checkpoints"] if c["name"] == "loop.ckpt"]
    assert row["status"] == "bad-alias" and row["problems"] == ["points to itself"]


def test_an_unreadable_checkpoint_says_permission_denied(make_run, run_dir):
    make_run(last_alias=None)
    newest = os.path.join(run_dir, "epoch=0-step=30.ckpt")
    os.chmod(newest, 0o000)
    try:
        proc = run_cli("list", run_dir, "--json", unprivileged=True)
        resolved = run_cli("resolve", run_dir, unprivileged=True)
    finally:
        os.chmod(newest, 0o644)
    rows = {r["name"]: r for r in json.loads(proc.stdout)["checkpoints"]}
    assert rows["epoch=0-step=30.ckpt"]["status"] == "unreadable"
    assert "Permission denied" in rows["epoch=0-step=30.ckpt"]["problems"][0]
    assert resolved.returncode == 0 and resolved.stdout.strip().endswith("epoch=0-step=20.ckpt")
