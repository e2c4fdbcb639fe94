"""The library as code written by others uses it: natural first-run patterns, errors that travel, clear refusals."""

from __future__ import annotations

import inspect
import multiprocessing
import os
import pickle
import subprocess
import sys

import pytest
import torch

import ckptmgr
from ckptmgr import CheckpointManager, KeepEveryNSteps, KeepLast, UsageError, errors
from ckptmgr.durations import parse_duration
from tests.conftest import REPO, tensor_state


def test_the_first_run_pattern_works_before_the_run_directory_exists(tmp_path):
    manager = CheckpointManager(str(tmp_path / "not-yet"))
    found = manager.resolve()
    start = found.step if found else 0
    assert start == 0 and manager.checkpoints() == [] and not os.path.exists(tmp_path / "not-yet")


ERROR_CLASSES = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
                 if issubclass(cls, errors.CkptMgrError)]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=[c.__name__ for c in ERROR_CLASSES])
def test_every_error_survives_pickling(cls):
    error = cls("/runs/x", "what failed", hint="what to do")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls and str(again) == str(error)
    assert (again.path, again.message, again.hint, again.exit_code) == ("/runs/x", "what failed", "what to do",
                                                                        cls.exit_code)


def _raise_in_child() -> None:
    raise errors.NoValidCheckpointError("/runs/x", "3 candidate(s), none valid")


def test_an_error_raised_in_another_process_arrives_as_itself():
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        with pytest.raises(errors.NoValidCheckpointError, match="none valid"):
            pool.apply(_raise_in_child)


@pytest.mark.parametrize("call", [
    lambda: parse_duration("soon"), lambda: parse_duration(-5), lambda: parse_duration("1:2"),
    lambda: KeepLast(n=0), lambda: KeepEveryNSteps(n="10"), lambda: CheckpointManager("r", keep_last=0),
    lambda: CheckpointManager("r", durability_timeout_s=0), lambda: CheckpointManager("r", last_alias="../x"),
])
def test_bad_arguments_are_usage_errors_which_are_value_errors(call):
    with pytest.raises(UsageError) as info:
        call()
    assert isinstance(info.value, ValueError) and info.value.exit_code == 2


def test_what_checkpoints_returns_can_be_loaded(make_run, run_dir):
    manager = make_run()
    newest = manager.checkpoints()[0]
    assert float(manager.load(newest)["bias"][0]) == 30.0
    assert float(manager.load("epoch=0-step=10.ckpt")["bias"][0]) == 10.0


@pytest.mark.parametrize("name, message", [("../escape.ckpt", "one path component"), ("a/b.ckpt", "one path component"),
                                           (".hidden.ckpt", "reserved"), ("x" * 256, "at most 255 bytes")])
def test_bad_names_are_refused_before_anything_is_written(name, message, run_dir):
    manager = CheckpointManager(run_dir)
    with pytest.raises(UsageError, match=message):
        manager.save(tensor_state(1), step=1, name=name)
    assert not os.path.exists(run_dir)


@pytest.mark.parametrize("length", [230, 245, 255])
def test_names_up_to_the_limit_of_a_file_name_are_saved_and_resolved(length, run_dir):
    name = "n" * (length - 5) + ".ckpt"
    with CheckpointManager(run_dir, keep_last=1) as manager:
        manager.save(tensor_state(1), step=1, name=name)
        manager.save(tensor_state(2), step=2, name=name, replace=True)  # saved over: records by stem
        manager.save(tensor_state(3), step=3)  # and retention deletes it
    found = CheckpointManager(run_dir).resolve()
    assert found.step == 3 and not os.path.exists(os.path.join(run_dir, name))
    assert len(os.listdir(os.path.join(run_dir, ".ckptmgr", "manifests"))) == 2  # step=3.ckpt and last.ckpt


def test_delete_takes_a_name_of_this_run_and_guards_the_newest(make_run, run_dir, tmp_path):
    manager = make_run(last_alias=None)
    with manager:
        with pytest.raises(UsageError, match="not a checkpoint of this run"):
            manager.delete(str(tmp_path / "elsewhere" / "epoch=0-step=10.ckpt"))
        with pytest.raises(UsageError, match="not a checkpoint of this run"):
            manager.delete("../run/epoch=0-step=10.ckpt")
        with pytest.raises(UsageError, match="reserved"):
            manager.delete(".ckptmgr")
        with pytest.raises(UsageError, match="refusing to delete the newest valid checkpoint"):
            manager.delete("epoch=0-step=30.ckpt")
        manager.delete(os.path.join(run_dir, "epoch=0-step=10.ckpt"))  # a path inside the run is fine
        manager.delete("epoch=0-step=30.ckpt", force=True)
    assert [c.name for c in manager.checkpoints()] == ["epoch=0-step=20.ckpt"]


def test_retention_takes_the_exported_policies(run_dir):
    with CheckpointManager(run_dir, retention=[KeepLast(n=1), KeepEveryNSteps(n=20)], last_alias=None) as manager:
        for step in range(10, 60, 10):
            manager.save(tensor_state(step), step=step)
    assert sorted(c.step for c in manager.checkpoints()) == [20, 40, 50]


def test_the_manager_documents_every_parameter():
    doc = CheckpointManager.__doc__
    for name in inspect.signature(CheckpointManager).parameters:
        assert f"{name}:" in doc, name


def test_estimate_works_on_a_core_install_without_lightning(tmp_path):
    """`ckptmgr estimate` parses its --time-limit without importing the Lightning integration."""
    probe = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None; "
             "from ckptmgr.cli import main; sys.exit(main(sys.argv[1:]))")
    with CheckpointManager(str(tmp_path / "run"), keep_last=None) as manager:
        manager.save(tensor_state(1), step=1)
    proc = subprocess.run([sys.executable, "-c", probe, "estimate", str(tmp_path / "run"), "--time-limit", "2h"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    assert "not enough history" in proc.stdout


def test_the_trainer_is_not_installed_as_a_top_level_package(tmp_path):
    """`training` is the project's job, run from the repository: installing ckptmgr must not shadow a user's
    own `training` package."""
    proc = subprocess.run([sys.executable, "-c", "import importlib.util, ckptmgr; "
                           "print(importlib.util.find_spec('training'))"], cwd=tmp_path, capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"


def test_package_exports_are_importable():
    for name in ckptmgr.__all__:
        assert getattr(ckptmgr, name) is not None
    assert isinstance(torch.__version__, str)
