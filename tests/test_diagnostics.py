"""walk, estimate and timeline on real trees with every kind of fault."""

from __future__ import annotations

import json
import os
import shutil

import torch

from ckptmgr import CheckpointManager
from ckptmgr.journal import journal_path
from ckptmgr.records import read_records
from tests.conftest import run_cli, tensor_state
from tests.helpers.files import deepspeed_dir, flip, flip_inside_record, snapshot, torch_file


def build_tree(root: str) -> None:
    """good/ all valid; bad/ one of every managed fault and leftover, plus stray files that are no checkpoint;
    legacy/ unsealed files and directories."""
    for run in ("good", "bad"):
        with CheckpointManager(os.path.join(root, "exp", run), keep_last=None) as m:
            for step in (10, 20, 30, 40):
                m.save(tensor_state(step), step=step, epoch=0)
    bad = os.path.join(root, "exp", "bad")
    state = os.path.join(bad, ".ckptmgr")
    flip(os.path.join(bad, "epoch=0-step=40.ckpt"), "middle")  # corrupt
    os.unlink(record_of(bad, "epoch=0-step=30.ckpt"))  # no record left: a legacy file written without CRC32s
    os.makedirs(os.path.join(bad, "epoch=0-step=35.ckpt"))  # a directory a crashed foreign writer left
    open(os.path.join(bad, "epoch=0-step=35.ckpt", "part.bin"), "wb").close()
    shutil.copyfile(os.path.join(bad, "epoch=0-step=20.ckpt"), os.path.join(state, "staging", "step=50.ckpt.0000abcd"))
    os.makedirs(os.path.join(state, "trash"))
    shutil.copyfile(os.path.join(bad, "epoch=0-step=10.ckpt"), os.path.join(state, "trash", "step=5.ckpt.0000abce"))
    os.makedirs(os.path.join(state, "quarantine", "epoch=0-step=9.ckpt.0000abcf.1"))
    with open(os.path.join(bad, ".ckptmgr-sealed-original.last.ckpt.z"), "wb") as f:
        f.write(b"x")
    os.unlink(os.path.join(bad, "last.ckpt"))
    os.unlink(record_of(bad, "last.ckpt"))
    os.symlink("epoch=0-step=99.ckpt", os.path.join(bad, "last.ckpt"))  # dangling
    os.symlink("../../good/epoch=0-step=40.ckpt", os.path.join(bad, "last-v1.ckpt"))  # into another run
    with open(os.path.join(bad, "eval-step=30.json"), "w") as f:  # a metrics file: no checkpoint, no problem
        f.write("{}")
    os.mkfifo(os.path.join(bad, "epoch=0-step=60.ckpt"))  # a FIFO named like one: never opened, never a checkpoint
    legacy = os.path.join(root, "legacy", "checkpoints")
    torch_file(os.path.join(legacy, "epoch=0-step=5.ckpt"))
    flip_inside_record(torch_file(os.path.join(legacy, "epoch=0-step=6.ckpt")))
    deepspeed_dir(os.path.join(legacy, "last.ckpt"))
    with open(os.path.join(deepspeed_dir(os.path.join(legacy, "epoch=0-step=7.ckpt")), "latest"), "w") as f:
        f.write("global_step7")  # names a tag that is not there: can never load
    os.makedirs(os.path.join(root, "unrelated", "deep", "dir"))


def record_of(run_dir: str, name: str) -> str:
    (path,) = [r.path for r in read_records(run_dir) if r.manifest is not None and r.manifest.name == name]
    return path


def test_walk_classifies_every_fault(tmp_path):
    root = str(tmp_path / "volume")
    build_tree(root)
    before = snapshot(root)
    proc = run_cli("walk", root, "--json")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    runs = {os.path.relpath(r["path"], root): r for r in data["runs"]}
    assert sorted(runs) == ["exp/bad", "exp/good", "legacy/checkpoints"]
    good, bad, legacy = runs["exp/good"], runs["exp/bad"], runs["legacy/checkpoints"]
    assert good["problems"] == 0 and good["resume"] == "epoch=0-step=40.ckpt" and good["checkpoint_count"] == 5
    assert good["newest_valid_step"] == 40 and good["invocations"] == 1 and good["last_commit_age_s"] >= 0
    assert good["total_bytes"] == sum(os.path.getsize(os.path.join(root, "exp", "good", f"epoch=0-step={s}.ckpt"))
                                      for s in (10, 20, 30, 40))  # the hard-linked `last` counted once
    status = {c["name"]: c["status"] for c in bad["checkpoints"]}
    assert status == {"epoch=0-step=40.ckpt": "corrupt", "epoch=0-step=35.ckpt": "incomplete",
                      "epoch=0-step=30.ckpt": "legacy-unchecked", "epoch=0-step=20.ckpt": "valid",
                      "epoch=0-step=10.ckpt": "valid", "last.ckpt": "bad-alias", "last-v1.ckpt": "bad-alias"}
    assert bad["resume"] == "epoch=0-step=20.ckpt"
    problems = {c["name"]: c["problems"] for c in bad["checkpoints"]}
    assert problems["epoch=0-step=40.ckpt"] == ["xxh3_128 mismatch (content differs from the manifest)"]
    assert problems["last.ckpt"] == ["points to missing epoch=0-step=99.ckpt"]
    assert problems["last-v1.ckpt"] == ["points outside the run directory ('../../good/epoch=0-step=40.ckpt')"]
    assert sorted(item["kind"] for item in bad["leftovers"]) == ["quarantined", "sealed-original", "staging", "trash"]
    legacy_status = {c["name"]: c["status"] for c in legacy["checkpoints"]}
    assert legacy_status == {"epoch=0-step=5.ckpt": "legacy-ok", "epoch=0-step=6.ckpt": "legacy-corrupt",
                             "epoch=0-step=7.ckpt": "legacy-corrupt", "last.ckpt": "legacy-ok"}
    assert legacy["resume"] is None
    assert snapshot(root) == before  # walk modified nothing
    # Off a terminal every line is printed whole: the resume pick and full step numbers survive a pipe.
    text = run_cli("walk", root).stdout
    assert f"{os.path.join(root, 'exp', 'bad')}  " in text and "resume: epoch=0-step=20.ckpt" in text


def test_walk_reports_a_directory_it_cannot_read(tmp_path):
    root = str(tmp_path / "volume")
    with CheckpointManager(os.path.join(root, "locked", "run"), keep_last=None) as m:
        m.save(tensor_state(1), step=1)
    os.chmod(os.path.join(root, "locked"), 0o000)
    try:
        proc = run_cli("walk", root, "--json", unprivileged=True)
    finally:
        os.chmod(os.path.join(root, "locked"), 0o755)
    assert proc.returncode == 1, proc.stderr
    (run,) = json.loads(proc.stdout)["runs"]
    assert run["path"] == os.path.join(root, "locked") and "permission denied" in run["error"]


def test_walk_quick_and_all_valid(tmp_path):
    root = str(tmp_path / "volume")
    with CheckpointManager(os.path.join(root, "run"), keep_last=None) as m:
        m.save(tensor_state(1), step=1)
    proc = run_cli("walk", root)
    assert proc.returncode == 0 and "1 run(s), 0 problem(s)" in proc.stdout
    flip(os.path.join(root, "run", "step=1.ckpt"), "middle")
    assert run_cli("walk", root, "--quick").returncode == 0  # quick: sizes only, a flip goes unseen
    assert run_cli("walk", root).returncode == 1
    assert run_cli("walk", str(tmp_path / "nope")).returncode == 2


def write_journal(run_dir: str, events: list[dict]) -> None:
    os.makedirs(os.path.dirname(journal_path(run_dir)), exist_ok=True)
    with open(journal_path(run_dir), "w") as f:
        for event in events:
            f.write(json.dumps(event) + "\n")
        f.write('{"event": "save", "unix": 1')  # a torn last line, as a crash leaves it: skipped


def test_estimate_against_a_known_history(tmp_path):
    run_dir = str(tmp_path / "run")
    t0 = 1_800_000_000.0
    events = [{"event": "open", "invocation": "a", "unix": t0}]
    # 2.0 s per step: saves every 100 steps, 200 s apart, 3 s each
    events += [{"event": "save", "invocation": "a", "unix": t0 + 200 * i, "step": 100 * i, "seconds": 3.0,
                "name": f"step={100 * i}.ckpt"} for i in range(1, 6)]
    events += [{"event": "open", "invocation": "b", "unix": t0 + 5000},
               {"event": "save", "invocation": "b", "unix": t0 + 5400, "step": 700, "seconds": 3.0},
               {"event": "save", "invocation": "b", "unix": t0 + 5800, "step": 900, "seconds": 3.0}]
    write_journal(run_dir, events)
    proc = run_cli("estimate", run_dir, "--total-steps", "10000", "--time-limit", "1h", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["seconds_per_step"] == 2.0 and d["steps_per_invocation"] == 1800
    assert d["current_step"] == 900 and d["remaining_steps"] == 9100 and d["invocations_needed"] == 6
    assert d["invocations_so_far"] == 2 and d["save_seconds_mean"] == 3.0
    proc = run_cli("estimate", run_dir, "--epochs", "2", "--steps-per-epoch", "1000", "--time-limit", "00:01:00:00")
    assert proc.returncode == 0 and "1,100 steps" in proc.stdout


def test_estimate_is_honest_with_too_little_history(tmp_path):
    run_dir = str(tmp_path / "run")
    write_journal(run_dir, [{"event": "open", "invocation": "a", "unix": 1.0},
                            {"event": "save", "invocation": "a", "unix": 2.0, "step": 5, "seconds": 1.0}])
    proc = run_cli("estimate", run_dir, "--total-steps", "100")
    assert proc.returncode == 1 and "not enough history" in proc.stdout
    proc = run_cli("estimate", run_dir, "--total-steps", "1", "--epochs", "2")
    assert proc.returncode == 2


def test_timeline_renders_png_and_html(tmp_path):
    run_dir = str(tmp_path / "run")
    for _ in range(2):  # two invocations
        with CheckpointManager(run_dir, keep_last=2) as m:
            start = (m.resolve().step if m.resolve() else 0)
            for step in range(start + 10, start + 50, 10):
                m.save({"w": torch.ones(4)}, step=step)
        import ckptmgr.manager as manager_module  # a new process would have a new invocation id
        manager_module.PROCESS_INVOCATION = manager_module.PROCESS_INVOCATION[::-1]
    proc = run_cli("timeline", run_dir, "-o", str(tmp_path / "t.png"), "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["invocations"] == 2 and d["saves"] == 8
    size = os.path.getsize(tmp_path / "t.png")
    assert 10_000 < size < 1_000_000
    with open(tmp_path / "t.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert run_cli("timeline", run_dir, "-o", str(tmp_path / "t.html")).returncode == 0
    with open(tmp_path / "t.html") as f:
        assert "<svg" in f.read()
    assert run_cli("timeline", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")).returncode == 2
