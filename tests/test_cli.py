"""The CLI: every command, --json, and every failure path as one line with a distinct exit code."""

from __future__ import annotations

import json
import os

import pytest

from ckptmgr.records import read_records
from tests.conftest import REPO, run_cli
from tests.helpers.files import snapshot


def assert_one_line_error(proc, code: int, text: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("ckptmgr: error: ")
    assert text in proc.stderr


def test_help_explains_each_command():
    for command in ("verify", "list", "resolve", "seal"):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0 and "--json" in proc.stdout
    proc = run_cli("--help")
    assert "Exit codes" in proc.stdout


def test_json_outputs(make_run, run_dir):
    make_run()
    verify = json.loads(run_cli("verify", run_dir, "--json").stdout)
    assert verify["all_valid"] and [c["step"] for c in verify["checkpoints"]] == [30, 30, 20, 10]
    assert {c["format_version"] for c in verify["checkpoints"]} == {3}
    listing = json.loads(run_cli("list", run_dir, "--json").stdout)
    assert listing["resume"] == "epoch=0-step=30.ckpt"
    rows = {r["name"]: r for r in listing["checkpoints"]}
    assert [r["status"] for r in listing["checkpoints"]] == ["valid"] * 4
    # `last.ckpt` is a hard link of the newest (say which: where links are not supported it is a full copy)
    assert (rows["last.ckpt"]["alias_of"], rows["last.ckpt"]["alias"]) == ("epoch=0-step=30.ckpt", "hardlink")
    resolved = json.loads(run_cli("resolve", run_dir, "--json").stdout)
    assert resolved["load_path"] == os.path.join(run_dir, "epoch=0-step=30.ckpt")
    quick = json.loads(run_cli("verify", run_dir, "--quick", "--json").stdout)
    assert quick["mode"] == "quick" and all(c["bytes_hashed"] == 0 for c in quick["checkpoints"])


def test_verify_single_checkpoint_human(make_run, run_dir):
    make_run()
    proc = run_cli("verify", os.path.join(run_dir, "epoch=0-step=20.ckpt"))
    assert proc.returncode == 0 and "1 checked, 0 invalid" in proc.stdout


@pytest.mark.parametrize("command", ["verify", "list", "resolve", "seal"])
def test_missing_path(command, tmp_path):
    assert_one_line_error(run_cli(command, str(tmp_path / "nope")), 2, "no such")


@pytest.mark.parametrize("command", ["verify", "seal"])
def test_not_a_checkpoint_file(command, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_one_line_error(run_cli(command, str(path)), 3, "not a checkpoint")
    assert path.read_text() == "hello"


@pytest.mark.parametrize("command", ["list", "resolve", "estimate", "walk"])
def test_run_commands_on_a_file(command, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_one_line_error(run_cli(command, str(path)), 3, "not a")


def test_verify_empty_directory(tmp_path):
    assert_one_line_error(run_cli("verify", str(tmp_path)), 3, "no checkpoints here")


def test_permission_denied(make_run, run_dir):
    make_run()
    before = snapshot(run_dir)
    os.chmod(run_dir, 0o000)
    try:
        for command in ("verify", "list", "resolve"):
            assert_one_line_error(run_cli(command, run_dir, unprivileged=True), 4, "permission denied")
    finally:
        os.chmod(run_dir, 0o755)
    assert snapshot(run_dir) == before


def test_unreadable_record(make_run, run_dir):
    make_run(last_alias=None)
    ckpt = os.path.join(run_dir, "epoch=0-step=30.ckpt")
    (record,) = [r.path for r in read_records(run_dir) if r.manifest.name == "epoch=0-step=30.ckpt"]
    os.chmod(record, 0o000)
    proc = run_cli("verify", ckpt, unprivileged=True)
    assert proc.returncode == 1 and "unreadable" in proc.stdout and "permission denied" in proc.stdout
    # resolve falls back past it, naming why
    proc = run_cli("resolve", run_dir, unprivileged=True)
    assert proc.returncode == 0 and "epoch=0-step=20.ckpt" in proc.stdout and "unreadable" in proc.stderr


def test_usage_errors(tmp_path):
    assert_one_line_error(run_cli(), 2, "required")
    assert_one_line_error(run_cli("verify"), 2, "required")
    assert_one_line_error(run_cli("verify", str(tmp_path), "--bogus"), 2, "unrecognized")
    assert_one_line_error(run_cli("seal", str(tmp_path), "--step", "x"), 2, "invalid int")


def test_json_error_object(tmp_path):
    proc = run_cli("verify", str(tmp_path / "nope"), "--json")
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["type"] == "PathNotFoundError"


def test_readers_never_modify_nor_import_torch(make_run, run_dir):
    make_run()
    before = snapshot(run_dir)
    probe = ("import sys; from ckptmgr.cli import main; rc = main(sys.argv[1:]); "
             "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    import subprocess
    import sys

    from tests.conftest import REPO

    for args in (["verify", run_dir], ["list", run_dir], ["resolve", run_dir]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO))
        assert proc.returncode == 0, proc.stderr
    assert snapshot(run_dir) == before


EVERY_COMMAND = [["verify", "{p}"], ["list", "{p}"], ["resolve", "{p}"], ["seal", "{p}"], ["walk", "{p}"],
                 ["export", "{p}", "-o", "{out}"], ["estimate", "{p}", "--total-steps", "10"],
                 ["timeline", "{p}", "-o", "{out}.png"]]


def readme_exit_codes() -> dict[str, int]:
    """README's exit-code table: the meaning each bad input below is held to."""
    with open(os.path.join(REPO, "README.md")) as f:
        rows = [line.split("|") for line in f if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    table = {row[2].strip(): int(row[1]) for row in rows}
    return {"missing": _code(table, "does not exist"), "text-file": _code(table, "not a run directory"),
            "empty-dir": _code(table, "an empty directory,"), "fifo": _code(table, "a FIFO"),
            "unreadable": _code(table, "permission denied"), "nothing-valid": _code(table, "an empty run directory")}


def _code(table: dict[str, int], words: str) -> int:
    (code,) = [c for meaning, c in table.items() if words in meaning]
    return code


def make_bad_input(kind: str, tmp_path) -> str:
    path = tmp_path / "input"
    if kind == "text-file":
        path.write_text("not a checkpoint")
    elif kind == "empty-dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "unreadable":
        path.mkdir()
        (path / "epoch=0-step=1.ckpt").write_bytes(b"x")
        os.chmod(path, 0o000)
    return str(path)


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=[c[0] for c in EVERY_COMMAND])
@pytest.mark.parametrize("kind", ["text-file", "missing", "empty-dir", "fifo", "unreadable"])
def test_every_command_refuses_bad_input_in_one_line(command, kind, tmp_path):
    """The same bad input gets the same exit code from every command: the one README's table gives."""
    path = make_bad_input(kind, tmp_path)
    args = [a.format(p=path, out=tmp_path / "out") for a in command]
    try:
        before = snapshot(str(tmp_path))
        proc = run_cli(*args, unprivileged=kind == "unreadable")
    finally:
        if kind == "unreadable":
            os.chmod(path, 0o755)
    expected = readme_exit_codes()[kind]
    if kind == "empty-dir" and command[0] in ("list", "resolve", "estimate", "walk", "timeline"):
        # An empty directory is a run with nothing in it yet: nothing to resume (1), nothing wrong (walk: 0),
        # no journal to draw (timeline: 3, as a checkpoint command given it).
        expected = {"walk": 0, "timeline": 3}.get(command[0], readme_exit_codes()["nothing-valid"])
    assert proc.returncode == expected, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    if expected > 1:  # an error, not a verdict and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("ckptmgr: error: ")
    if kind != "unreadable":
        assert snapshot(str(tmp_path)) == before  # nothing created or modified
