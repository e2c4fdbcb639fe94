"""The trainer end to end: real Lightning runs, killed, signalled, budgeted, corrupted, resumed.

The reference for "exact" is an uninterrupted run with the same config: the
final weights and optimizer state must be bitwise identical.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from ckptmgr import CheckpointManager
from ckptmgr.catalog import resolve
from tests.helpers.files import flip
from tests.helpers.trainer import assert_identical, final_state, run_trainer, trainer, wait_for_step

STEPS = 90


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, dict]:
    """An uninterrupted run of STEPS steps."""
    output = str(tmp_path_factory.mktemp("reference"))
    code, out, err = run_trainer(output, "ref", "--max-steps", str(STEPS))
    assert code == 0, err
    assert "complete" in out
    return output, final_state(output, "ref")


def test_main_job_runs_and_its_checkpoints_load(reference):
    output, state = reference
    assert state["global_step"] == STEPS and "state_dict" in state
    assert "ckptmgr" in state and len(state["ckptmgr"]["rng"]) == 1
    names = sorted(os.listdir(os.path.join(output, "runs", "ref")))
    assert names == [".ckptmgr", "epoch=0-step=60.ckpt", "epoch=0-step=80.ckpt", "epoch=0-step=90.ckpt", "last.ckpt"]


def test_resume_after_sigkill_is_bitwise_identical(reference, tmp_path):
    output = str(tmp_path)
    proc = trainer(output, "run", "--max-steps", "100000")
    wait_for_step(os.path.join(output, "runs", "run"), 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    code, out, err = run_trainer(output, "run", "--max-steps", str(STEPS))
    assert code == 0, err
    assert "[ckptmgr] resuming from" in err
    assert_identical(reference[1], final_state(output, "run"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_saves_stops_and_resumes_exactly(signum, reference, tmp_path):
    output = str(tmp_path)
    run_dir = os.path.join(output, "runs", "run")
    proc = trainer(output, "run", "--max-steps", "100000", "--json")
    wait_for_step(run_dir, 20, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    summary = json.loads(out)
    assert summary["stop_reason"] == f"signal {int(signum)} (checkpoint saved)"
    stopped_at = summary["end_step"]
    assert resolve(run_dir).step == stopped_at  # the stop step itself was saved
    if stopped_at < STEPS:
        code, out, err = run_trainer(output, "run", "--max-steps", str(STEPS))
        assert code == 0, err
        assert_identical(reference[1], final_state(output, "run"))


def test_signal_with_no_time_to_save_does_not_start_one(tmp_path):
    output = str(tmp_path)
    run_dir = os.path.join(output, "runs", "run")
    proc = trainer(output, "run", "--max-steps", "100000", "--grace", "0", "--json")
    wait_for_step(run_dir, 20, proc)
    before = resolve(run_dir).step
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75
    summary = json.loads(out)
    assert summary["stop_reason"].endswith("(checkpoint skipped)")
    assert "does not fit the 0 s grace period" in err
    assert resolve(run_dir).step % 20 == 0 and resolve(run_dir).step >= before  # only periodic saves


def test_time_budget_stops_and_every_invocation_gets_a_full_budget(tmp_path):
    output = str(tmp_path)
    # An early first save, so the stop decision uses a measured save time, not the 5 s assumed before one.
    budget = ["--max-steps", "100000", "--time-budget", "25", "--budget-margin", "0", "--save-step", "5", "--json"]
    runs = []
    for _ in range(2):
        started = time.monotonic()
        code, out, err = run_trainer(output, "run", *budget)
        runs.append((code, json.loads(out), time.monotonic() - started))
    for code, summary, wall in runs:
        assert code == 75 and summary["stop_reason"] == "time budget"
        # The budget counts from process start: the trainer's own clock says when it stopped.
        assert summary["wall_seconds"] <= 25 + 1, summary
        assert wall < 25 + 30  # and the process ended soon after (interpreter exit, loaded CI box)
        assert summary["end_step"] - summary["start_step"] > 5  # real progress, the second time too
    first, second = runs[0][1], runs[1][1]
    assert second["start_step"] == first["end_step"]  # resumed where the budget stopped it
    assert resolve(os.path.join(output, "runs", "run")).step == second["end_step"]


def test_lightning_max_time_is_cumulative_which_is_why_time_budget_exists(tmp_path):
    """The peer defect, shown with real Lightning: the second invocation stops almost at once."""
    import lightning.pytorch as pl

    from training.model import TinyTransformer

    steps = []
    for _ in range(2):
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
        trainer = pl.Trainer(max_time={"seconds": 8}, callbacks=[checkpoint], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        last = os.path.join(str(tmp_path), "last.ckpt")
        start = torch.load(last, weights_only=False)["global_step"] if os.path.exists(last) else 0
        trainer.fit(TinyTransformer(width=32, layers=1), ckpt_path=last if os.path.exists(last) else None)
        steps.append(trainer.global_step - start)
    # The first invocation trains for its 8 s; the second, resumed, stops almost at once.
    assert steps[0] > 5 and steps[1] <= 2


def test_corrupt_last_falls_back_and_quarantines(reference, tmp_path):
    output = str(tmp_path)
    run_dir = os.path.join(output, "runs", "run")
    code, _, err = run_trainer(output, "run", "--max-steps", "60")
    assert code == 0, err
    newest = os.path.join(run_dir, "epoch=0-step=60.ckpt")
    flip(newest, "middle")  # last.ckpt is the same bytes (a hard link): torn too
    code, out, err = run_trainer(output, "run", "--max-steps", str(STEPS))
    assert code == 0, err
    assert f"skipping {newest}: xxh3_128 mismatch" in err
    assert "resuming from" in err and "epoch=0-step=40.ckpt (step 40" in err
    quarantined = sorted(os.listdir(os.path.join(run_dir, ".ckptmgr", "quarantine")))
    assert [q.split(".ckpt.")[0] for q in quarantined] == ["epoch=0-step=60", "last"]
    assert_identical(reference[1], final_state(output, "run"))


def test_all_corrupt_fails_loudly_unless_fresh_start_allowed(tmp_path):
    output = str(tmp_path)
    run_dir = os.path.join(output, "runs", "run")
    assert run_trainer(output, "run", "--max-steps", "40")[0] == 0
    for name in os.listdir(run_dir):
        if name.startswith("epoch="):
            flip(os.path.join(run_dir, name), "start")
    code, out, err = run_trainer(output, "run", "--max-steps", "60")
    assert code == 1 and "none valid" in err and "Traceback" not in err
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("epoch=")) == ["epoch=0-step=20.ckpt",
                                                                               "epoch=0-step=40.ckpt"]
    code, out, err = run_trainer(output, "run", "--max-steps", "20", "--allow-fresh", "--json")
    assert code == 0 and "starting fresh as allowed" in err
    assert json.loads(out)["start_step"] == 0


def test_config_change_is_refused_unless_forced(tmp_path):
    output = str(tmp_path)
    assert run_trainer(output, "run", "--max-steps", "20")[0] == 0
    code, _, err = run_trainer(output, "run", "--max-steps", "40", "--lr", "0.1")
    assert code == 7 and "another experiment config" in err
    code, _, err = run_trainer(output, "run", "--max-steps", "40", "--lr", "0.1", "--force-config")
    assert code == 0, err


def test_no_resume_moves_old_run_aside_never_deletes(tmp_path):
    output = str(tmp_path)
    assert run_trainer(output, "run", "--max-steps", "20")[0] == 0
    code, out, err = run_trainer(output, "run", "--max-steps", "20", "--no-resume", "--json")
    assert code == 0 and json.loads(out)["start_step"] == 0
    runs = sorted(os.listdir(os.path.join(output, "runs")))
    assert runs[0] == "run" and runs[1].startswith("run.superseded-")
    assert resolve(os.path.join(output, "runs", runs[1])).step == 20  # the old checkpoint, intact


def test_ddp_two_cpu_processes_write_one_consistent_checkpoint(tmp_path):
    output = str(tmp_path)
    code, out, err = run_trainer(output, "ddp", "--strategy", "ddp", "--devices", "2", "--accelerator", "cpu",
                                 "--max-steps", "40", "--json", timeout=600)
    assert code == 0, err
    run_dir = os.path.join(output, "runs", "ddp")
    found = CheckpointManager(run_dir).resolve()
    assert found.step == 40 and found.manifest.world_size == 2
    state = torch.load(found.load_path, weights_only=False)
    assert len(state["ckptmgr"]["rng"]) == 2  # both ranks' RNG states
    assert not [n for n in os.listdir(run_dir) if n.startswith(".ckptmgr-")]
    # resume on 2 ranks continues
    code, out, err = run_trainer(output, "ddp", "--strategy", "ddp", "--devices", "2", "--accelerator", "cpu",
                                 "--max-steps", "60", "--json", timeout=600)
    assert code == 0, err
    assert json.loads(out)["end_step"] == 60


def test_async_save_resume_after_sigkill_is_bitwise_identical(reference, tmp_path):
    output = str(tmp_path)
    proc = trainer(output, "run", "--max-steps", "100000", "--async-save")
    wait_for_step(os.path.join(output, "runs", "run"), 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    code, out, err = run_trainer(output, "run", "--max-steps", str(STEPS), "--async-save")
    assert code == 0, err
    assert_identical(reference[1], final_state(output, "run"))


@pytest.mark.parametrize("second", [[], ["--no-resume"]], ids=["resume", "no-resume"])
def test_a_second_trainer_is_refused_before_it_trains_or_moves_anything(second, tmp_path):
    output = str(tmp_path)
    run_dir = os.path.join(output, "runs", "run")
    first = trainer(output, "run", "--max-steps", "100000")
    try:
        wait_for_step(run_dir, 20, first)
        started = time.monotonic()
        code, out, err = run_trainer(output, "run", "--max-steps", "100000", *second, timeout=120)
        assert code == 5 and "another writer holds this run directory" in err and "Traceback" not in err
        assert f"pid {first.pid}" in err
        assert time.monotonic() - started < 60  # refused at start, not after training for a while
        assert sorted(os.listdir(os.path.join(output, "runs"))) == ["run"]  # nothing moved aside
        assert first.poll() is None  # the first writer goes on
        wait_for_step(run_dir, 40, first)
    finally:
        first.kill()
        first.communicate()
    with open(os.path.join(run_dir, ".ckptmgr", "journal.jsonl")) as f:
        invocations = {json.loads(line)["invocation"] for line in f if '"save"' in line}
    assert len(invocations) == 1  # one writer's saves only


def test_a_run_path_that_is_a_file_is_refused_before_anything(tmp_path):
    os.makedirs(tmp_path / "runs")
    (tmp_path / "runs" / "run").write_text("not a directory")
    code, out, err = run_trainer(str(tmp_path), "run", "--max-steps", "20")
    assert code == 2 and "exists and is not a directory" in err and "starting fresh" not in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine FSDP runs (benchmarks/gpu/fsdp_e2e.py)")
def test_fsdp_without_gpus_is_refused_in_one_line_before_anything(tmp_path):
    code, out, err = run_trainer(str(tmp_path), "run", "--strategy", "fsdp", "--max-steps", "20")
    assert code == 2 and "--strategy fsdp needs GPUs" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "runs")


def test_no_resume_with_a_name_at_the_length_limit(tmp_path):
    name = "r" * 240
    assert run_trainer(str(tmp_path), name, "--max-steps", "20")[0] == 0
    code, out, err = run_trainer(str(tmp_path), name, "--max-steps", "20", "--no-resume")
    assert code == 0, err
    moved = [n for n in os.listdir(tmp_path / "runs") if ".superseded-" in n]
    assert len(moved) == 1 and len(moved[0].encode()) <= 255
    assert resolve(str(tmp_path / "runs" / moved[0])).step == 20
