"""The Modal trainer, offline: configuration, and the function bodies run with .local().

CKPTMGR_LOCAL_VOLUME points the code at a temporary directory standing in for the
Volume; no Modal account or network is involved.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from ckptmgr import CommitError
from ckptmgr.catalog import resolve
from tests.conftest import REPO

SCRIPT_DIR = os.path.join(REPO, "scripts", "train")


@pytest.fixture
def modal_train(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTMGR_LOCAL_VOLUME", str(tmp_path / "volume"))
    monkeypatch.syspath_prepend(SCRIPT_DIR)
    sys.modules.pop("modal_train", None)
    module = importlib.import_module("modal_train")
    yield module
    sys.modules.pop("modal_train", None)


def test_import_needs_no_network_and_config_is_sane():
    code = (f"import sys; sys.path.insert(0, {SCRIPT_DIR!r}); import modal_train as m; "
            "print(m.MOUNT, m.TIMEOUT_S, m.RETRIES, m.VOLUME_NAME, m.train._spec_.gpus, list(m.train._spec_.volumes))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTMGR_")}
    env.update(PYTHONPATH=REPO, MODAL_TOKEN_ID="", MODAL_TOKEN_SECRET="", https_proxy="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mount, timeout, retries, volume, gpus, volumes = proc.stdout.split(maxsplit=5)
    assert mount == "/output" and int(timeout) <= 86400 and int(retries) >= 1
    assert volume == "infinisst-outputs" and gpus == "H100:8" and "/output" in volumes


def test_gpu_spec_parsing(modal_train):
    assert modal_train.parse_gpu("H100:8") == ("H100", 8)
    assert modal_train.parse_gpu("A10G") == ("A10G", 1)
    for bad in ("H100:0", "H100:x", ":2", ""):
        with pytest.raises(ValueError, match="GPU spec"):
            modal_train.parse_gpu(bad)


def test_budget_comes_from_the_function_timeout(modal_train):
    assert modal_train.TIMEOUT_S - modal_train.BUDGET_MARGIN_S > 0.9 * modal_train.TIMEOUT_S


def summary(start, end, *, complete=False, reason="time budget"):
    return {"complete": complete, "stop_reason": reason, "start_step": start, "end_step": end}


def test_auto_continue_decision(modal_train):
    decide = modal_train.should_continue
    assert decide(summary(0, 100), 1, 3) == (True, "time budget reached: continuing")
    assert decide(summary(0, 100, complete=True, reason="max_steps"), 1, 3)[0] is False
    assert decide(summary(0, 100), 3, 3) == (False, "reached --max-invocations 3")
    assert decide(summary(0, 100, reason="signal 15 (checkpoint saved)"), 1, 3)[0] is False
    assert decide(summary(100, 100), 1, 3) == (False, "no progress in this invocation: not continuing")


def test_fresh_run_then_resume_on_the_second_call(modal_train, tmp_path):
    first = modal_train.train.local(run_name="r", max_steps=30, save_step=10, devices=1, time_budget_s=600)
    assert first["complete"] and first["start_step"] == 0 and first["end_step"] == 30
    run_dir = str(tmp_path / "volume" / "en-zh" / "runs" / "r")
    assert resolve(run_dir).step == 30
    second = modal_train.train.local(run_name="r", max_steps=50, save_step=10, devices=1, time_budget_s=600)
    assert second["start_step"] == 30 and second["end_step"] == 50 and second["resumed_from"].endswith("step=30.ckpt")


def test_auto_continue_chains_invocations_until_the_limit(modal_train, tmp_path):
    # Until the first save is measured the trainer assumes a save takes 5 s (x1.5 safety): save early.
    result = modal_train.train.local(run_name="c", max_steps=100_000, save_step=5, devices=1, time_budget_s=12,
                                     auto_continue=True, max_invocations=2)
    # How far the first invocation gets depends on the machine's load (start-up eats the 12 s budget): any
    # progress will do; what is checked is that the chain continues from it.
    assert result["stop_reason"] == "time budget" and result["end_step"] > 0
    following = result["next"]
    assert following["invocation"] == 2 and following["start_step"] == result["end_step"]
    assert following["end_step"] > following["start_step"]
    assert following["continue_reason"] == "reached --max-invocations 2" and "next" not in following
    assert following["estimated_invocations_left"] > 0


def test_no_resume_training_keeps_old_data(modal_train, tmp_path):
    modal_train.train.local(run_name="n", max_steps=20, save_step=10, devices=1, time_budget_s=600)
    again = modal_train.train.local(run_name="n", max_steps=20, save_step=10, devices=1, time_budget_s=600,
                                    resume=False)
    assert again["start_step"] == 0
    runs = sorted(os.listdir(tmp_path / "volume" / "en-zh" / "runs"))
    assert runs[0] == "n" and runs[1].startswith("n.superseded-")
    assert resolve(str(tmp_path / "volume" / "en-zh" / "runs" / runs[1])).step == 20


class FailingVolume:
    def __init__(self, fail_after: int):
        self.calls = 0
        self.fail_after = fail_after

    def commit(self):
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("volume commit failed: connection reset")


def test_failing_volume_commit_means_not_acknowledged(modal_train, tmp_path):
    root = str(tmp_path / "volume")
    target = FailingVolume(fail_after=2)
    with pytest.raises(CommitError, match="volume commit failed"):
        modal_train.run_invocation(root=root, lang_pair="en-zh", run_name="f", max_steps=100, save_step=10,
                                   resume=True, time_budget_s=600, durability=modal_train.VolumeCommit(target),
                                   keep_last=1)
    run_dir = os.path.join(root, "en-zh", "runs", "f")
    # Saves 10 and 20 were acknowledged; 30 was published locally but its commit failed:
    # `last` still names 20 and retention (keep 1) did not delete 20 after 30.
    assert torch.load(os.path.join(run_dir, "last.ckpt"), weights_only=False)["global_step"] == 20
    assert os.path.isfile(os.path.join(run_dir, "epoch=0-step=20.ckpt"))


def test_remote_utilities_run_on_the_volume(modal_train, tmp_path, capsys):
    modal_train.train.local(run_name="u", max_steps=20, save_step=10, devices=1, time_budget_s=600)
    assert modal_train.walk.local(path="/output") == 0
    assert modal_train.verify.local(path="/output/en-zh/runs/u") == 0
    assert modal_train.export.local(src="/output/en-zh/runs/u/last.ckpt", output="/output/en-zh/model",
                                    strip_prefix="") == 0
    assert os.path.isfile(tmp_path / "volume" / "en-zh" / "model" / "model.safetensors")
    assert "1 run(s), 0 problem(s)" in capsys.readouterr().out
