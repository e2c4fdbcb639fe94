"""ManagedCheckpoint is a drop-in ModelCheckpoint, in both Lightning namespaces.

Each comparison runs a real Trainer twice, once with Lightning's ModelCheckpoint and once with
ManagedCheckpoint, and compares what lands in `dirpath` (names and bytes that load the same),
top-k and `last`. The checkpoints it writes are plain `.ckpt` files: Lightning's own loaders,
torch.load and a Trainer without any ckptmgr plugin open them. (Lightning's own test suite for
ModelCheckpoint runs against ManagedCheckpoint in tests/test_lightning_contract.py.)
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ckptmgr import CheckpointManager, InvalidCheckpointError
from tests.conftest import REPO
from tests.helpers.files import flip

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]
CKPTMGR = {"lightning.pytorch": "ckptmgr.lightning", "pytorch_lightning": "ckptmgr.pytorch_lightning"}


def managed(ns: str, **kwargs):
    return importlib.import_module(CKPTMGR[ns]).ManagedCheckpoint(**kwargs)


def module_class(ns):
    pl = importlib.import_module(ns)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch).pow(2).mean()
            # a metric with a known, non-monotonic shape, for top-k by monitor
            self.log("score", float((self.global_step * 7) % 5), on_step=True, on_epoch=False)
            return loss

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return torch.utils.data.DataLoader(torch.randn(12, 4, generator=g), batch_size=2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return pl, Tiny


def fit(ns, callback, *, max_steps=12, ckpt_path=None, plugins=None):
    pl, Tiny = module_class(ns)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu", plugins=plugins)
    torch.manual_seed(0)  # the same initial weights in every run, so runs can be compared
    trainer.fit(Tiny(), ckpt_path=ckpt_path)
    return trainer


def entries(dirpath):
    return sorted(n for n in os.listdir(dirpath) if not n.startswith("."))


CONFIGS = {
    "top-k-by-monitor": dict(monitor="score", mode="max", save_top_k=2, every_n_train_steps=2, save_last=True),
    "save-last-link": dict(every_n_train_steps=3, save_top_k=-1, save_last="link"),
    "last-only": dict(every_n_train_steps=4, save_top_k=0, save_last=True),
    "template-no-metric-name": dict(filename="model-{step}-{score:.1f}", monitor="score", mode="min",
                                    save_top_k=3, every_n_train_steps=2, auto_insert_metric_name=False),
    "every-epoch": dict(every_n_epochs=1, save_top_k=-1),
    "weights-only": dict(every_n_train_steps=6, save_weights_only=True, save_top_k=1),
    "fixed-name-overwritten": dict(filename="fixed", every_n_train_steps=3, save_top_k=-1,
                                   enable_version_counter=False),
}


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_drop_in_matches_model_checkpoint(ns, name, tmp_path):
    pl = importlib.import_module(ns)
    kwargs = CONFIGS[name]
    plain = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "plain"), **kwargs)
    ours = managed(ns, dirpath=str(tmp_path / "managed"), **kwargs)
    fit(ns, plain)
    fit(ns, ours)
    # The same files under the same names: Lightning's `last.ckpt` copy is a hard link here (no second write).
    assert entries(tmp_path / "managed") == entries(tmp_path / "plain")
    for attr in ("best_model_path", "kth_best_model_path", "last_model_path"):
        assert os.path.basename(getattr(ours, attr)) == os.path.basename(getattr(plain, attr)), attr
    assert sorted(map(os.path.basename, ours.best_k_models)) == sorted(map(os.path.basename, plain.best_k_models))
    for entry in entries(tmp_path / "plain"):
        a = torch.load(tmp_path / "plain" / entry, weights_only=False)
        b = torch.load(tmp_path / "managed" / entry, weights_only=False)
        assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]), entry
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), entry
        assert ("optimizer_states" in a) == ("optimizer_states" in b)
        assert os.path.islink(tmp_path / "plain" / entry) == os.path.islink(tmp_path / "managed" / entry)
    # Everything it wrote verifies, without exception.
    statuses = {c.name: c.status for c in CheckpointManager(str(tmp_path / "managed")).checkpoints()}
    assert set(statuses.values()) <= {"valid", "alias"}, statuses


@pytest.mark.parametrize("ns", NAMESPACES)
def test_every_tool_opens_what_it_writes(ns, tmp_path):
    """load_from_checkpoint, torch.load, and a fresh Trainer without our plugin: the documented workflows."""
    pl, Tiny = module_class(ns)
    ours = managed(ns, dirpath=str(tmp_path), monitor="score", mode="max", save_top_k=2, every_n_train_steps=2,
                   save_last=True)
    fit(ns, ours)
    assert os.path.isfile(ours.best_model_path) and os.path.isfile(ours.last_model_path)
    model = Tiny.load_from_checkpoint(ours.best_model_path)
    assert isinstance(model, Tiny)
    state = torch.load(ours.last_model_path, weights_only=False)
    assert state["global_step"] == 12 and "ckptmgr" in state  # RNG states travel in the checkpoint
    plain_trainer = pl.Trainer(max_steps=14, logger=False, enable_progress_bar=False, enable_model_summary=False,
                               limit_val_batches=0, accelerator="cpu", enable_checkpointing=False)
    plain_trainer.fit(Tiny(), ckpt_path=ours.best_model_path)
    assert plain_trainer.global_step == 14
    # Through our Trainer too, and a corrupt managed checkpoint is refused, not loaded.
    for path in (ours.best_model_path, ours.last_model_path):
        trainer = fit(ns, managed(ns, dirpath=str(tmp_path / "again"), save_top_k=-1, every_n_train_steps=100),
                      max_steps=14, ckpt_path=path)
        assert trainer.global_step == 14
    flip(ours.best_model_path, "middle")
    with pytest.raises(InvalidCheckpointError, match="refusing to load"):
        fit(ns, managed(ns, dirpath=str(tmp_path / "third")), max_steps=20, ckpt_path=ours.best_model_path)


@pytest.mark.parametrize("first, second", [("plain", "managed"), ("managed", "plain")])
def test_switching_between_model_checkpoint_and_managed_keeps_the_callback_state(first, second, tmp_path):
    import lightning.pytorch as pl

    kwargs = dict(dirpath=str(tmp_path), monitor="score", mode="max", save_top_k=2, every_n_train_steps=2,
                  save_last=True)
    make = {"plain": lambda: pl.callbacks.ModelCheckpoint(**kwargs),
            "managed": lambda: managed("lightning.pytorch", **kwargs)}
    before = make[first]()
    fit("lightning.pytorch", before)
    after = make[second]()
    assert after.state_key == before.state_key
    _, Tiny = module_class("lightning.pytorch")
    trainer = pl.Trainer(max_steps=12, callbacks=[after], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(Tiny(), ckpt_path=before.last_model_path)  # resumes at step 12: no step to take
    assert after.best_model_path == before.best_model_path
    assert after.kth_best_model_path == before.kth_best_model_path
    assert {k: float(v) for k, v in after.best_k_models.items()} == {k: float(v) for k, v in
                                                                    before.best_k_models.items()}


def test_a_callback_for_the_other_namespace_is_refused_by_name(tmp_path):
    # (With every argument at its default, the other Trainer refuses it even earlier: its own default
    # ModelCheckpoint has the same state key.)
    ours = managed("lightning.pytorch", dirpath=str(tmp_path), every_n_train_steps=1)
    with pytest.raises(TypeError, match="import it from ckptmgr.pytorch_lightning"):
        fit("pytorch_lightning", ours, max_steps=2)


def test_signature_is_model_checkpoints_plus_ours():
    import inspect

    import lightning.pytorch as pl

    ours = inspect.signature(managed("lightning.pytorch").__class__).parameters
    theirs = inspect.signature(pl.callbacks.ModelCheckpoint).parameters
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default and ours[name].annotation == parameter.annotation, name
    assert set(ours) - set(theirs) == {"durability", "durability_timeout_s", "config_fingerprint", "async_save"}


def test_lightning_cli_configures_it_from_yaml(tmp_path):
    """`class_path: ckptmgr.lightning.ManagedCheckpoint` in a LightningCLI config, as a user writes it."""
    config = tmp_path / "experiment.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          max_steps: 6
          logger: false
          enable_progress_bar: false
          accelerator: cpu
          limit_val_batches: 0
          callbacks:
            - class_path: ckptmgr.lightning.ManagedCheckpoint
              init_args:
                dirpath: {tmp_path / "run"}
                save_last: link
                every_n_train_steps: 2
                save_top_k: -1
    """))
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent("""
        from lightning.pytorch.cli import LightningCLI
        from lightning.pytorch.demos.boring_classes import BoringModel
        LightningCLI(BoringModel)
    """))
    proc = subprocess.run([sys.executable, str(script), "fit", "--config", str(config)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert os.readlink(run / "last.ckpt") == "epoch=0-step=6.ckpt"  # save_last: link, as configured
    assert sorted(entries(run)) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    assert CheckpointManager(str(run)).resolve().step == 6


def test_async_save_gives_the_same_checkpoints(tmp_path):
    kwargs = dict(monitor="step", mode="max", save_top_k=2, every_n_train_steps=2, save_last=True)
    sync = managed("lightning.pytorch", dirpath=str(tmp_path / "sync"), **kwargs)
    background = managed("lightning.pytorch", dirpath=str(tmp_path / "async"), async_save=True, **kwargs)
    fit("lightning.pytorch", sync)
    fit("lightning.pytorch", background)
    assert entries(tmp_path / "async") == entries(tmp_path / "sync")
    run_dir = str(tmp_path / "async")
    found = CheckpointManager(run_dir).resolve()
    assert found.step == 12 and os.path.samefile(os.path.join(run_dir, "last.ckpt"), found.path)
    statuses = {c.name: c.status for c in CheckpointManager(run_dir).checkpoints()}
    assert set(statuses.values()) == {"valid"}, statuses
    a = torch.load(found.load_path, weights_only=False)["state_dict"]
    b = torch.load(CheckpointManager(str(tmp_path / "sync")).resolve().load_path, weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the snapshot is the state at the save step


def test_async_save_failure_surfaces_and_deletes_nothing(tmp_path):
    from ckptmgr import CommitError

    class FailSecond:
        calls = 0

        def persist(self, path):
            FailSecond.calls += 1
            if FailSecond.calls == 2:
                raise RuntimeError("volume commit failed")

    callback = managed("lightning.pytorch", dirpath=str(tmp_path), save_top_k=1, every_n_train_steps=4,
                       async_save=True, durability=FailSecond())
    with pytest.raises(CommitError, match="volume commit failed"):
        fit("lightning.pytorch", callback)
    # The first save (step 4) stays: its removal was queued after the failed save and never ran.
    assert CheckpointManager(str(tmp_path)).resolve().step in (4, 8)
    assert os.path.isfile(tmp_path / "epoch=0-step=4.ckpt")


def test_sync_saves_never_touch_the_system_temp_dir(tmp_path, monkeypatch):
    """Lightning's own save stages the bytes in the system temp dir (fsspec) and moves them: with an unusable
    temp dir (a full tmpfs, a small container disk) it fails. Ours writes beside the target and never goes there."""
    import tempfile

    import lightning.pytorch as pl

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))  # every default temp file fails
    with pytest.raises(FileNotFoundError):  # the control: Lightning's own ModelCheckpoint needs it
        fit("lightning.pytorch", pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "plain"), every_n_train_steps=3))
    fit("lightning.pytorch", managed("lightning.pytorch", dirpath=str(tmp_path / "run"), every_n_train_steps=3,
                                     save_top_k=-1))
    assert len(entries(tmp_path / "run")) == 4 and CheckpointManager(str(tmp_path / "run")).resolve().step == 12
