"""The Modal trainer, offline: configuration, and the function bodies run with .local().

CKPTMGR_LOCAL_VOLUME points the code at a temporary directory standing in for the
Volume; no Modal account or network is involved.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time

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


def summary(start, end, *, complete=False, stop="time_budget", reason="time budget"):
    return {"complete": complete, "stop": stop, "stop_reason": reason, "start_step": start, "end_step": end}


def test_auto_continue_decision(modal_train):
    decide = modal_train.should_continue
    assert decide(summary(0, 100), 1, 3) == (True, "time budget reached: continuing")
    assert decide(summary(0, 100, complete=True, stop="complete", reason="max_steps"), 1, 3)[0] is False
    assert decide(summary(0, 100), 3, 3) == (False, "reached --max-invocations 3")
    assert decide(summary(0, 100, stop="cancelled", reason="signal 10 (checkpoint saved)"), 1, 3)[0] is False
    assert decide(summary(100, 100), 1, 3) == (False, "no progress in this invocation: not continuing")


def test_fresh_run_then_resume_on_the_second_call(modal_train, tmp_path):
    first = modal_train.train.local(run_name="r", max_steps=30, save_step=10, devices=1, time_budget_s=600)
    assert first["stop"] == "complete"
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
    assert root == modal_train.runtime().root
    rt = modal_train.runtime()
    modal_train.prepare_run(rt, run_name="f", lang_pair="en-zh", fresh=False, chain="c", config={})
    from ckptmgr.modal import VolumeCommit

    with pytest.raises(CommitError, match="volume commit failed"):
        modal_train.run_invocation(rt, run_name="f", lang_pair="en-zh", chain="c", invocation=1, max_steps=100,
                                   save_step=10, time_budget_s=600, durability=VolumeCommit(target), keep_last=1)
    run_dir = os.path.join(root, "en-zh", "runs", "f")
    # Saves 10 and 20 were acknowledged; 30 was published locally but its commit failed:
    # `last` still names 20 and retention (keep 1) did not delete 20 after 30.
    assert torch.load(os.path.join(run_dir, "last.ckpt"), weights_only=False)["global_step"] == 20
    assert os.path.isfile(os.path.join(run_dir, "epoch=0-step=20.ckpt"))


def test_remote_utilities_run_on_the_volume(modal_train, tmp_path, capsys):
    modal_train.train.local(run_name="u", max_steps=20, save_step=10, devices=1, time_budget_s=600)
    assert modal_train.walk_volume.local(path="/output") == 0
    assert modal_train.verify_volume.local(path="/output/en-zh/runs/u") == 0
    # Export goes beside the run, not into it (the run directory holds checkpoints only).
    assert modal_train.export_volume.local(src="/output/en-zh/runs/u/last.ckpt", strip_prefix="") == 0
    assert os.path.isfile(tmp_path / "volume" / "en-zh" / "exports" / "u-last" / "model.safetensors")
    assert "1 run(s), 0 problem(s)" in capsys.readouterr().out
    # Exit codes reach the shell: a problem is a non-zero exit, success raises nothing.
    with open(tmp_path / "volume" / "en-zh" / "runs" / "u" / "epoch=0-step=20.ckpt", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    assert modal_train.verify_volume.local(path="/output/en-zh/runs/u") == 1
    with pytest.raises(SystemExit) as info:
        modal_train._exit(1)
    assert info.value.code == 1
    modal_train._exit(0)  # no SystemExit for success


def test_seal_adopts_the_teams_existing_checkpoints(modal_train, tmp_path):
    legacy = tmp_path / "volume" / "en-zh" / "runs" / "old" / "epoch=1-step=500.ckpt"
    legacy.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 500}, legacy)
    assert modal_train.seal_volume.local(path="/output/en-zh/runs/old/epoch=1-step=500.ckpt") == 0
    assert resolve(str(legacy.parent)).step == 500


def test_a_later_invocation_without_its_run_directory_is_an_error(modal_train, tmp_path):
    """A misspelled Volume or run name must not silently train from step 0."""
    from ckptmgr import NotACheckpointError

    with pytest.raises(NotACheckpointError, match="found no run directory"):
        modal_train.run_invocation(modal_train.runtime(), run_name="typo", lang_pair="en-zh", chain="c",
                                   invocation=2, max_steps=10, save_step=5, time_budget_s=60)


def test_a_deterministic_start_up_error_fails_in_the_cpu_preflight(modal_train, tmp_path):
    """A config mismatch is found by `prepare` (CPU, not retried), not by a GPU attempt."""
    from ckptmgr import ConfigMismatchError

    modal_train.train.local(run_name="m", max_steps=10, save_step=5, devices=1, time_budget_s=600)
    with pytest.raises(ConfigMismatchError):
        modal_train.prepare.local(run_name="m", lang_pair="en-zh", fresh=False, chain="x", config={"lr": 0.5})


def test_sigint_during_set_up_is_a_restart_not_a_failure(modal_train):
    """Lightning turns a KeyboardInterrupt during set-up into sys.exit(1) (a burned retry): it is re-raised as
    KeyboardInterrupt, and SIGINT handling is restored afterwards."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with modal_train.interrupts_restart_the_input():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                raise SystemExit(1) from None  # what Lightning does with it
    assert signal.getsignal(signal.SIGINT) is before


def test_function_configuration(modal_train):
    """Findings 5, 8, 9 and 10: what the functions ask Modal for."""
    import ast
    import inspect

    source = inspect.getsource(modal_train)
    decorators = {node.name: {k.arg: ast.unparse(k.value) for d in node.decorator_list if isinstance(d, ast.Call)
                              for k in d.keywords}
                  for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
    train = decorators["train"]
    assert train["single_use_containers"] == "True" and train["max_containers"] == "1"
    assert train["cpu"] == "CPU" and train["memory"] == "MEMORY_MB" and "prepare" in decorators
    (train_def,) = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "train"]
    defaults = dict(zip([a.arg for a in train_def.args.args][-len(train_def.args.defaults):],
                        [ast.unparse(d) for d in train_def.args.defaults], strict=True))
    assert modal_train.GRACE_S == 20 and defaults["grace_s"] == "GRACE_S"
    (main_def,) = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "main"]
    main = ast.unparse(main_def)
    assert "train.with_options(gpu=gpu).spawn(" in main and "call.get()" in main and "train.remote" not in main
    assert "pip_install_from_pyproject" in source and "torch==" not in source
    from ckptmgr.modal import VolumeCommit  # the hook is the library's, not the script's

    assert not hasattr(modal_train, "VolumeCommit") and VolumeCommit
