"""Running the project's trainer (`python -m training`) as a real subprocess, for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from ckptmgr import CheckpointManager
from ckptmgr.catalog import resolve
from tests.conftest import REPO

COMMON = ["--save-step", "20", "--no-progress-bar", "--width", "32", "--layers", "1"]


def trainer(output: str, run: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "training", "--output-dir", output, "--run-name", run, *COMMON, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO))


def run_trainer(output: str, run: str, *args: str, timeout: float = 300) -> tuple[int, str, str]:
    proc = trainer(output, run, *args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def final_state(output: str, run: str) -> dict:
    return CheckpointManager(os.path.join(output, "runs", run)).load(weights_only=False)


def assert_identical(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.isdir(run_dir):
            found = resolve(run_dir, quick=True)
            if found is not None and found.step >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} in time")
