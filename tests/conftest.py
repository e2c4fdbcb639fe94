"""Shared fixtures: real files, real torch, real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ckptmgr import CheckpointManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tensor_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"weight": torch.randn(64, 64, generator=g), "bias": torch.full((64,), float(step))}


@pytest.fixture
def run_dir(tmp_path) -> str:
    return str(tmp_path / "run")


@pytest.fixture
def make_run(run_dir):
    """Save checkpoints at the given steps (epoch 0) and return the manager, closed."""

    def make(steps=(10, 20, 30), **kwargs) -> CheckpointManager:
        kwargs.setdefault("keep_last", None)
        manager = CheckpointManager(run_dir, **kwargs)
        with manager:
            for step in steps:
                manager.save(tensor_state(step), step=step, epoch=0)
        return manager

    return make


def run_cli(*args: str, cwd: str | None = None, unprivileged: bool = False) -> subprocess.CompletedProcess:
    """Run the real `ckptmgr` entry point in a subprocess.

    ``unprivileged`` runs it in a new user namespace (``unshare -U``), where
    root loses CAP_DAC_OVERRIDE: a chmod 000 path then really is denied, as
    it is for any ordinary user.
    """
    env = dict(os.environ, PYTHONPATH=REPO, COLUMNS="200")
    prefix = ["unshare", "-U"] if unprivileged else []
    return subprocess.run([*prefix, sys.executable, "-m", "ckptmgr", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)
