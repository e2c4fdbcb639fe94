"""Format 2 run directories (ckptmgr 0.2) keep working: they resolve and load, new saves are format 3,
and retention orders and deletes across the mix."""

from __future__ import annotations

import json
import os

import torch

from ckptmgr import CheckpointManager
from ckptmgr.catalog import resolve, scan
from tests.conftest import tensor_state
from tests.helpers.format2 import convert_to_format2, write_format2_run
from tests.helpers.trainer import run_trainer


def test_a_format2_run_continues_in_format3(tmp_path):
    run_dir = str(tmp_path / "run")
    write_format2_run(run_dir, steps=(10, 20, 30))
    assert resolve(run_dir).step == 30
    with CheckpointManager(run_dir, keep_last=2) as manager:
        assert float(manager.load()["bias"][0]) == 30.0  # loads the format-2 directory's checkpoint.pt
        manager.save(tensor_state(40), step=40, epoch=0)
        manager.save(tensor_state(50), step=50, epoch=0)
    forms = {c.name: (c.form, c.manifest.format_version) for c in scan(run_dir)}
    # Retention kept the newest two (format 3) and deleted the format-2 directories, oldest first;
    # `last.ckpt` (a symlink in format 2) is now a hard link with its own record.
    assert forms == {"epoch=0-step=50.ckpt": ("managed", 3), "epoch=0-step=40.ckpt": ("managed", 3),
                     "last.ckpt": ("managed", 3)}
    assert os.path.isfile(os.path.join(run_dir, "epoch=0-step=50.ckpt"))
    assert not os.path.islink(os.path.join(run_dir, "last.ckpt"))
    assert float(CheckpointManager(run_dir).load()["bias"][0]) == 50.0


def test_sequences_continue_across_formats(tmp_path):
    run_dir = str(tmp_path / "run")
    write_format2_run(run_dir, steps=(10, 20))
    with CheckpointManager(run_dir, keep_last=None) as manager:
        new = manager.save(tensor_state(20), step=20, epoch=0, name="again.ckpt")
    assert new.sequence == 3  # after the format-2 ones: a tie at step 20 goes to the newer commit
    assert resolve(run_dir).name == "again.ckpt"


def test_the_trainer_resumes_a_format2_run_and_goes_on_in_format3(tmp_path):
    output = str(tmp_path)
    run_dir = os.path.join(output, "runs", "run")
    code, _, err = run_trainer(output, "run", "--max-steps", "40", "--checkpointing", "lightning")
    assert code == 0, err
    convert_to_format2(run_dir)  # as ckptmgr 0.2 would have left it
    assert resolve(run_dir).step == 40
    code, out, err = run_trainer(output, "run", "--max-steps", "80", "--json")
    assert code == 0, err
    assert json.loads(out)["start_step"] == 40 and "resuming from" in err
    found = resolve(run_dir)
    assert found.step == 80 and found.manifest.format_version == 3 and os.path.isfile(found.path)
    assert torch.load(os.path.join(run_dir, "last.ckpt"), weights_only=False)["global_step"] == 80
