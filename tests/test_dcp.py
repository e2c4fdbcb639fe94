"""PyTorch Distributed Checkpoint through ckptmgr.dcp: real FSDP2 training on CPU (torchrun, 2 ranks, gloo).

The crash sweep kills ranks for real (SIGKILL mid-write, in the commit, or the whole job at random moments),
resumes, and requires the run to end bitwise equal to an uninterrupted one. The corruption matrix damages
managed and unmanaged DCP directories the ways the issue names and requires verify, walk, seal and load to
classify each correctly.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckptmgr import CheckpointManager, CkptMgrError, CommitError, ConfigMismatchError, NoValidCheckpointError
from ckptmgr import dcp as managed_dcp
from ckptmgr.dcp_layout import METADATA_NAME, read_metadata
from ckptmgr.verify import Status, verify_checkpoint
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.xdist_group("dcp")  # one worker launches them all, one torchrun at a time

WORKER = os.path.join(REPO, "tests", "helpers", "dcp_worker.py")
ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
STEPS = 8


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           WORKER, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def committed_steps(stdout: str) -> list[int]:
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("committed ")]


def load_state(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run; rank 0's storage fails any fsync of a file, so nothing may be re-read at commit."""
    root = tmp_path_factory.mktemp("dcp-baseline")
    dump = root / "dump"
    dump.mkdir()
    proc = torchrun(str(root / "run"), "--steps", str(STEPS), "--dump", str(dump), "--forbid-rehash")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert committed_steps(proc.stdout) == [2, 4, 6, 8]
    return str(root / "run"), str(dump)


def test_every_save_commits_hashed_while_written(baseline):
    run, _ = baseline
    result = verify_checkpoint(os.path.join(run, "step=8.ckpt"))
    assert result.status is Status.VALID
    manifest = result.manifest
    assert manifest.kind == "dcp" and manifest.world_size == 2
    assert {f.path for f in manifest.files} == {METADATA_NAME, "__0_0.distcp", "__1_0.distcp"}
    assert manifest.layout["shards"] == {"0": [METADATA_NAME, "__0_0.distcp"], "1": ["__1_0.distcp"]}
    # DCP's own loader opens the published directory as it is.
    assert METADATA_NAME in os.listdir(os.path.join(run, "step=8.ckpt"))
    names = sorted(os.listdir(run))
    assert names == [".ckptmgr", "last.ckpt", "step=4.ckpt", "step=6.ckpt", "step=8.ckpt"]  # keep_last=3


def test_async_save_commits_the_same_checkpoints(baseline, tmp_path):
    _, dump = baseline
    mine = tmp_path / "dump"
    mine.mkdir()
    proc = torchrun(str(tmp_path / "run"), "--steps", str(STEPS), "--async", "--dump", str(mine))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert committed_steps(proc.stdout) == [2, 4, 6, 8]
    assert same_tensors(load_state(str(mine / "final.pt")), load_state(os.path.join(dump, "final.pt")))
    assert verify_checkpoint(str(tmp_path / "run" / "step=8.ckpt")).status is Status.VALID


def _walk(run: str) -> dict:
    proc = run_cli("walk", run, "--json")
    return json.loads(proc.stdout)


def _check_after_crash(run: str, acknowledged: int) -> int:
    """Nothing torn is published, and resume finds the newest acknowledged save (or newer)."""
    report = _walk(run)["runs"][0]
    for checkpoint in report["checkpoints"]:
        assert checkpoint["status"] == "valid", checkpoint
    picked = CheckpointManager(run).resolve()
    picked_step = picked.step if picked is not None else 0
    assert picked_step >= acknowledged
    return picked_step


def test_crash_sweep_resumes_bitwise_equal_to_an_uninterrupted_run(baseline, tmp_path):
    _, dump = baseline
    run = str(tmp_path / "run")
    acknowledged = 0
    kills = [
        ("rank 1 dies mid-write (save 1)", ["--die-rank", "1", "--die-save", "1", "--die-item", "3"]),
        ("rank 0 dies mid-write (save 1)", ["--die-rank", "0", "--die-save", "1", "--die-item", "5"]),
        ("rank 0 dies in the commit (op 4)", ["--die-in-commit", "4"]),
        ("rank 0 dies in the commit (op 9)", ["--die-in-commit", "9"]),
    ]
    for what, extra in kills:
        proc = torchrun(run, "--steps", str(STEPS), *extra)
        assert proc.returncode != 0, f"{what}: the job was not killed"
        acknowledged = max([acknowledged, *committed_steps(proc.stdout)])
        _check_after_crash(run, acknowledged)
    rng = random.Random(16)
    for _ in range(3):  # the whole job killed at a random moment after some step (a preemption)
        acknowledged = max(acknowledged, _kill_job_at_random(run, rng))
        _check_after_crash(run, acknowledged)
    final = tmp_path / "dump"
    final.mkdir()
    proc = torchrun(run, "--steps", str(STEPS), "--dump", str(final))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert same_tensors(load_state(str(final / "final.pt")), load_state(os.path.join(dump, "final.pt")))
    assert _walk(run)["problems"] == 0  # the next writer cleaned up every crash's leftovers


def _kill_job_at_random(run: str, rng: random.Random) -> int:
    """SIGKILL every process of the job a random moment after a random step; return the last acknowledged."""
    target, delay = rng.randint(1, STEPS), rng.uniform(0.0, 0.3)
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            WORKER, run, "--steps", str(STEPS)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, env=ENV, start_new_session=True)
    lines = []
    try:
        for line in job.stdout:
            lines.append(line)
            if line.startswith("step ") and int(line.split()[1]) >= target:
                time.sleep(delay)
                break
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    return max(committed_steps("".join(lines)), default=0)


# -- the corruption matrix -------------------------------------------------------------
def _copy_run(baseline, tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(baseline[0], run)
    return run


def _unlink_shared(path: str) -> None:
    """Give a file its own inode (the `last` alias hard-links the newest checkpoint's files)."""
    data = open(path, "rb").read()
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(data)


def flip_in_item(checkpoint: str, file: str) -> None:
    """Flip one byte in the middle of the largest item DCP stored in ``file`` (inside tensor data)."""
    item = max((i for i in read_metadata(checkpoint).items if i.file == file), key=lambda i: i.length)
    path = os.path.join(checkpoint, file)
    _unlink_shared(path)
    with open(path, "r+b") as f:
        f.seek(item.offset + item.length // 2)
        byte = f.read(1)
        f.seek(item.offset + item.length // 2)
        f.write(bytes([byte[0] ^ 0x10]))


def name_a_missing_file(checkpoint: str) -> None:
    """Rewrite ``.metadata`` so that one item lives in a file that is not there."""
    raw = read_metadata(checkpoint).raw
    index = next(iter(raw.storage_data))
    raw.storage_data[index].relative_path = "__7_0.distcp"
    path = os.path.join(checkpoint, METADATA_NAME)
    os.unlink(path)
    with open(path, "wb") as f:
        pickle.dump(raw, f)


DAMAGE = {
    "missing rank file": lambda ck: os.unlink(os.path.join(ck, "__1_0.distcp")),
    "flipped byte in rank 1's file": lambda ck: flip_in_item(ck, "__1_0.distcp"),
    "metadata names a file not there": name_a_missing_file,
}
MANAGED_PROBLEM = {
    "missing rank file": "__1_0.distcp: missing",
    "flipped byte in rank 1's file": "__1_0.distcp: xxh3_128 mismatch",
    "metadata names a file not there": ".metadata: size",
}
UNMANAGED_PROBLEM = {
    "missing rank file": "__1_0.distcp: missing (named in .metadata)",
    "flipped byte in rank 1's file": "__1_0.distcp: CRC32 mismatch in item",
    "metadata names a file not there": "__7_0.distcp: missing (named in .metadata)",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_managed_checkpoint_is_classified_and_load_falls_back(baseline, tmp_path, damage):
    run = _copy_run(baseline, tmp_path)
    os.unlink(os.path.join(run, "last.ckpt", "__1_0.distcp"))  # keep `last` out of the fallback
    DAMAGE[damage](os.path.join(run, "step=8.ckpt"))
    report = {c["name"]: c for c in _walk(run)["runs"][0]["checkpoints"]}
    assert report["step=8.ckpt"]["status"] == "corrupt"
    assert any(MANAGED_PROBLEM[damage] in p for p in report["step=8.ckpt"]["problems"]), report["step=8.ckpt"]
    assert report["step=6.ckpt"]["status"] == "valid"
    # Resharded: saved by 2 ranks, loaded by this single process into a plain (unsharded) model.
    model = _plain_model()
    state = {"model": model.state_dict()}
    checkpoint = managed_dcp.load(state, CheckpointManager(run))
    assert checkpoint.name == "step=6.ckpt"
    assert same_tensors(state["model"], load_state(os.path.join(baseline[1], "step6.pt")))


def _plain_model() -> torch.nn.Module:
    from tests.helpers.dcp_worker import WIDTH

    torch.manual_seed(1)  # other values than the checkpoint's, so the load must overwrite them all
    return torch.nn.Sequential(torch.nn.Linear(32, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, WIDTH),
                               torch.nn.GELU(), torch.nn.Linear(WIDTH, 8))


def _unmanaged_copy(baseline, tmp_path) -> str:
    """What plain ``dcp.save`` writes: the same directory without ckptmgr's records."""
    run = tmp_path / "plain"
    run.mkdir()
    shutil.copytree(os.path.join(baseline[0], "step=8.ckpt"), run / "step=8")
    return str(run / "step=8")


@pytest.mark.parametrize("damage", [None, *DAMAGE])
def test_unmanaged_dcp_directory_is_checked_against_its_metadata(baseline, tmp_path, damage):
    checkpoint = _unmanaged_copy(baseline, tmp_path)
    if damage is not None:
        DAMAGE[damage](checkpoint)
    proc = run_cli("verify", checkpoint, "--json")
    result = json.loads(proc.stdout)["checkpoints"][0]
    walk = _walk(os.path.dirname(checkpoint))["runs"][0]["checkpoints"][0]
    if damage is None:
        assert proc.returncode == 0 and result["status"] == walk["status"] == "legacy-ok"
        sealed = run_cli("seal", checkpoint)
        assert sealed.returncode == 0, sealed.stderr
        manifest = verify_checkpoint(checkpoint).manifest
        assert manifest.kind == "dcp" and manifest.layout["shards"]["1"] == ["__1_0.distcp"]
        return
    assert proc.returncode == 1 and result["status"] == walk["status"] == "legacy-corrupt"
    assert any(UNMANAGED_PROBLEM[damage] in p for p in result["problems"]), result
    before = sorted(os.listdir(checkpoint))
    refused = run_cli("seal", checkpoint)
    assert refused.returncode == 1 and "refusing to seal" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(checkpoint)) == before


def test_truncated_rank_file_is_named(baseline, tmp_path):
    checkpoint = _unmanaged_copy(baseline, tmp_path)
    path = os.path.join(checkpoint, "__0_0.distcp")
    os.truncate(path, os.path.getsize(path) // 2)
    result = verify_checkpoint(checkpoint)
    assert result.status is Status.LEGACY_CORRUPT
    assert "__0_0.distcp" in result.reason and ".metadata places items up to byte" in result.reason


def test_rank_killed_mid_write_publishes_nothing(baseline, tmp_path):
    run = str(tmp_path / "run")
    proc = torchrun(run, "--steps", "2", "--die-rank", "1", "--die-save", "1", "--die-item", "2")
    assert proc.returncode != 0 and committed_steps(proc.stdout) == []
    walk = _walk(run)
    # Rank 0 either hears of the failure and removes the staging directory, or is killed by torchrun first
    # and leaves it to the next writer: walk reports it as staging, never as a checkpoint.
    assert {item["kind"] for item in walk["runs"][0]["leftovers"]} <= {"staging"}
    assert walk["runs"][0]["checkpoints"] == []
    with pytest.raises(NoValidCheckpointError):
        managed_dcp.load({"model": _plain_model().state_dict()}, CheckpointManager(run))


# -- in one process (no process group): the API's edges ---------------------------------
def test_single_process_round_trip_and_refusals(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    model = _plain_model()
    checkpoint = managed_dcp.save({"model": model.state_dict()}, manager, step=3)
    assert checkpoint.manifest.kind == "dcp" and checkpoint.manifest.world_size == 1
    other = _plain_model()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    state = {"model": other.state_dict()}
    assert managed_dcp.load(state, manager).name == checkpoint.name
    assert same_tensors(state["model"], model.state_dict())
    with pytest.raises(CkptMgrError):
        managed_dcp.save({"model": model.state_dict()}, manager, step=4, sync_files=False)
    manager.save({"w": torch.ones(2)}, step=5)  # a torch file, newer: not for DCP's loader
    with pytest.raises(ConfigMismatchError, match="not a DCP one"):
        managed_dcp.load(state, manager)
    manager.close()


class _FailingPlanner(dcp.DefaultSavePlanner):
    def resolve_data(self, write_item):
        raise OSError(28, "No space left on device")


def test_a_failed_write_publishes_nothing_and_says_which_rank(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    with pytest.raises(CommitError, match=r"DCP checkpoint not committed: rank 0: OSError: \[Errno 28\]"):
        managed_dcp.save({"model": _plain_model().state_dict()}, manager, step=1, planner=_FailingPlanner())
    assert os.listdir(tmp_path / "run" / ".ckptmgr" / "staging") == []
    assert manager.resolve() is None
    manager.close()


def test_hostile_metadata_is_never_executed(tmp_path):
    checkpoint = tmp_path / "plain" / "step=1"
    checkpoint.mkdir(parents=True)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (checkpoint / METADATA_NAME).write_bytes(pickle.dumps(Exploit()))
    (checkpoint / "__0_0.distcp").write_bytes(b"x" * 10)
    proc = run_cli("verify", str(checkpoint))
    assert proc.returncode == 1 and "not DCP metadata" in proc.stdout
    assert not marker.exists()
    refused = run_cli("seal", str(checkpoint))
    assert refused.returncode == 1 and not marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(baseline, tmp_path):
    checkpoint = _unmanaged_copy(baseline, tmp_path)
    raw = read_metadata(checkpoint).raw
    raw.storage_data[next(iter(raw.storage_data))].relative_path = "../../etc/passwd"
    with open(os.path.join(checkpoint, METADATA_NAME), "wb") as f:
        pickle.dump(raw, f)
    result = verify_checkpoint(checkpoint)
    assert result.status is Status.LEGACY_CORRUPT and "unusable location" in result.reason



# -- export ------------------------------------------------------------------------------
def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("managed", [True, False], ids=["managed", "unmanaged"])
def test_export_is_bitwise_equal_to_dcp_to_torch_save(baseline, tmp_path, managed):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src = os.path.join(baseline[0], "step=8.ckpt") if managed else _unmanaged_copy(baseline, tmp_path)
    proc = run_cli("export", src, "-o", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    dcp_to_torch_save(src, str(tmp_path / "reference.pt"))
    reference = {k: v for k, v in _flatten(torch.load(tmp_path / "reference.pt", weights_only=False)).items()
                 if isinstance(v, torch.Tensor)}
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert ours.keys() == reference.keys() and report["tensors"] == len(reference)
    for key in ours:
        assert ours[key].dtype == reference[key].dtype and torch.equal(ours[key], reference[key]), key
    assert "non-tensor entries left out" in report["source_kind"]  # AdamW's hyper-parameters
    assert run_cli("verify", str(tmp_path / "out")).returncode == 0


def test_export_of_the_model_alone_loads_into_the_plain_model(baseline, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "weights"
    proc = run_cli("export", os.path.join(baseline[0], "step=8.ckpt"), "-o", str(out), "--select", "model.",
                   "--strip-prefix", "model.")
    assert proc.returncode == 0, proc.stderr
    model = _plain_model()
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    assert same_tensors(model.state_dict(), load_state(os.path.join(baseline[1], "step8.pt")))


def test_export_refuses_a_corrupt_dcp_checkpoint_and_writes_nothing(baseline, tmp_path):
    run = _copy_run(baseline, tmp_path)
    flip_in_item(os.path.join(run, "step=8.ckpt"), "__0_0.distcp")
    proc = run_cli("export", os.path.join(run, "step=8.ckpt"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1 and "refusing to export a corrupt checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".ckptmgr")]
    nothing = run_cli("export", os.path.join(baseline[0], "step=8.ckpt"), "-o", str(tmp_path / "none"),
                      "--select", "nope.")
    assert nothing.returncode == 3 and "no tensor" in nothing.stderr
