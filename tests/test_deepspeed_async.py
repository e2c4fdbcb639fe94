"""Asynchronous DeepSpeed ZeRO-2/3 saves with real engines on CPU (torchrun, 2 ranks, gloo).

The save returns while every rank's snapshot is still being written; the next step runs at once and writes
every tensor the save snapshotted. The files must be byte for byte DeepSpeed's own save of that step, a
failure on one rank must be raised by the next save on every rank, and a job SIGKILLed while a save
persists must resume from the newest committed checkpoint and end bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ckptmgr import CheckpointManager
from ckptmgr.verify import Status, verify_checkpoint
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.xdist_group("deepspeed")

WORKER = os.path.join(REPO, "tests", "helpers", "ds_async_worker.py")
ENV = dict(os.environ, PYTHONPATH=REPO, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def torchrun(*args: str, session: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           WORKER, *args], capture_output=True, text=True, env=ENV, timeout=600,
                          start_new_session=session)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def checked(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"async-zero{request.param}"))
    proc = torchrun("check", str(request.param), out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    return request.param, out, report


def test_files_are_deepspeeds_own_bytes_though_the_next_step_ran_during_the_save(checked):
    stage, out, report = checked
    assert report["in_flight"], "the save had finished before it returned: nothing ran in the background"
    committed = report["committed"]
    assert committed == os.path.join(out, "run", "step=3.ckpt")
    reference = os.path.join(out, "ref", "checkpoint")
    names = sorted(os.listdir(reference))
    assert names == sorted(os.listdir(os.path.join(committed, "checkpoint")))
    assert len(names) == (4 if stage == 3 else 3)
    for name in names:
        with open(os.path.join(reference, name), "rb") as a, open(os.path.join(committed, "checkpoint", name),
                                                                    "rb") as b:
            assert a.read() == b.read(), name
    assert verify_checkpoint(committed).status is Status.VALID


def test_a_failed_background_save_is_raised_by_the_next_save_on_every_rank(checked):
    _, out, report = checked
    for outcome in report["outcomes"]:
        assert outcome.startswith("CommitError") and "rank 1" in outcome and "Input/output error" in outcome
    assert report["after"] == ["clean", "clean"]  # raised once, then nothing left in flight
    assert CheckpointManager(os.path.join(out, "run")).resolve().step == 3  # nothing published at step 5


def test_export_of_an_async_checkpoint_equals_zero_to_fp32(checked, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    _, out, _ = checked
    proc = run_cli("export", os.path.join(out, "run", "step=3.ckpt"), "-o", str(tmp_path / "model"))
    assert proc.returncode == 0, proc.stderr
    ours = load_file(str(tmp_path / "model" / "model.safetensors"))
    reference = get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, "ref"))
    assert sorted(ours) == sorted(reference)
    assert all(torch.equal(ours[name], tensor.contiguous()) for name, tensor in reference.items())


@pytest.mark.parametrize("stage,kill_after_save", [(2, 1), (2, 3), (3, 2)])
def test_sigkill_during_a_background_persist_resumes_exactly(tmp_path, stage, kill_after_save):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert torchrun("train", str(stage), full, "10").returncode == 0
    proc = torchrun("train", str(stage), killed, "10", str(kill_after_save), session=True)
    assert proc.returncode != 0  # killed while the save persisted
    staged = os.listdir(os.path.join(killed, "run", ".ckptmgr", "staging"))
    newest = CheckpointManager(os.path.join(killed, "run")).resolve()
    newest_step = newest.step if newest is not None else 0
    # Killed while it persisted (the usual case: staged, not committed), or just after it committed.
    assert (staged and newest_step == 2 * (kill_after_save - 1)) or newest_step == 2 * kill_after_save
    resumed = torchrun("train", str(stage), killed, "10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(os.path.join(full, "final-0.pt"))
    got = torch.load(os.path.join(killed, "final-0.pt"))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
