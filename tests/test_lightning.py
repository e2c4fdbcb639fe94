"""ManagedCheckpoint is a drop-in ModelCheckpoint, in both Lightning namespaces.

Each case runs a real Trainer twice, once with Lightning's ModelCheckpoint and
once with ManagedCheckpoint, and compares names, top-k and `last`; then loads
`best` and `last` through the Trainer.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from ckptmgr import CheckpointManager, InvalidCheckpointError
from ckptmgr.lightning import ManagedCheckpoint
from tests.test_corruption import flip

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


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


def fit(ns, callback, *, max_steps=12, ckpt_path=None):
    pl, Tiny = module_class(ns)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
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
}


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_drop_in_matches_model_checkpoint(ns, name, tmp_path):
    pl = importlib.import_module(ns)
    kwargs = CONFIGS[name]
    plain = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "plain"), **kwargs)
    managed = ManagedCheckpoint(dirpath=str(tmp_path / "managed"), **kwargs)
    fit(ns, plain)
    fit(ns, managed)
    plain_names, managed_names = entries(tmp_path / "plain"), entries(tmp_path / "managed")
    run_dir = str(tmp_path / "managed")
    if kwargs.get("save_last"):
        # Lightning writes last.ckpt as a second full copy; ours is an alias, so when the newest save is not
        # in the top k, its checkpoint stays (only) as the alias's target until `last` moves on.
        target = os.readlink(os.path.join(run_dir, "last.ckpt"))
        assert set(managed_names) - set(plain_names) <= {target}
        assert set(plain_names) - set(managed_names) == set()
    else:
        assert managed_names == plain_names
    for attr in ("best_model_path", "kth_best_model_path", "last_model_path"):
        assert os.path.basename(getattr(managed, attr)) == os.path.basename(getattr(plain, attr)), attr
    assert sorted(map(os.path.basename, managed.best_k_models)) == sorted(map(os.path.basename, plain.best_k_models))
    # Everything it wrote verifies, and `last` is an alias, not a second copy.
    assert all(c.result.valid for c in CheckpointManager(run_dir).checkpoints() if c.result is not None)
    if kwargs.get("save_last"):
        assert os.path.islink(os.path.join(run_dir, "last.ckpt"))


@pytest.mark.parametrize("ns", NAMESPACES)
def test_best_and_last_load_through_the_trainer(ns, tmp_path):
    managed = ManagedCheckpoint(dirpath=str(tmp_path), monitor="score", mode="max", save_top_k=2,
                                every_n_train_steps=2, save_last=True)
    fit(ns, managed)
    for path in (managed.best_model_path, managed.last_model_path):  # a checkpoint directory; the alias
        callback = ManagedCheckpoint(dirpath=str(tmp_path / "again"), save_top_k=-1, every_n_train_steps=100)
        trainer = fit(ns, callback, max_steps=14, ckpt_path=path)
        assert trainer.global_step == 14
    # A corrupt managed checkpoint is refused, not loaded.
    flip(os.path.join(managed.best_model_path, "checkpoint.pt"), "middle")
    with pytest.raises(InvalidCheckpointError, match="refusing to load"):
        fit(ns, ManagedCheckpoint(dirpath=str(tmp_path / "third")), max_steps=20, ckpt_path=managed.best_model_path)


def test_version_counter_and_overwrite(tmp_path):
    import lightning.pytorch as pl

    # An existing name: with the version counter Lightning picks -v1; without, it overwrites.
    for counter in (True, False):
        dirpath = tmp_path / f"counter-{counter}"
        first = ManagedCheckpoint(dirpath=str(dirpath), filename="fixed", every_n_train_steps=6,
                                  enable_version_counter=counter)
        fit("lightning.pytorch", first)
        plain = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / f"plain-{counter}"), filename="fixed",
                                             every_n_train_steps=6, enable_version_counter=counter)
        fit("lightning.pytorch", plain)
        assert entries(dirpath) == entries(tmp_path / f"plain-{counter}")
        found = CheckpointManager(str(dirpath)).resolve()
        assert found.step == 12  # the newest save holds the name
        assert not [n for n in os.listdir(dirpath) if n.startswith(".ckptmgr-")]


def test_isinstance_holds_in_both_namespaces(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no dirpath: Lightning saves under the working directory's checkpoints/
    import lightning.pytorch as L
    import pytorch_lightning as PL

    callback = ManagedCheckpoint()
    assert isinstance(callback, L.callbacks.ModelCheckpoint) and isinstance(callback, PL.callbacks.ModelCheckpoint)
    fit("pytorch_lightning", callback, max_steps=2)
    assert isinstance(callback, ManagedCheckpoint) and isinstance(callback, PL.callbacks.ModelCheckpoint)


def test_async_save_gives_the_same_checkpoints(tmp_path):
    kwargs = dict(monitor="step", mode="max", save_top_k=2, every_n_train_steps=2, save_last=True)
    sync = ManagedCheckpoint(dirpath=str(tmp_path / "sync"), **kwargs)
    background = ManagedCheckpoint(dirpath=str(tmp_path / "async"), async_save=True, **kwargs)
    fit("lightning.pytorch", sync)
    fit("lightning.pytorch", background)
    assert entries(tmp_path / "async") == entries(tmp_path / "sync")
    run_dir = str(tmp_path / "async")
    found = CheckpointManager(run_dir).resolve()
    assert found.step == 12 and os.readlink(os.path.join(run_dir, "last.ckpt")) == found.name
    assert all(c.result.valid for c in CheckpointManager(run_dir).checkpoints() if c.result is not None)
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

    callback = ManagedCheckpoint(dirpath=str(tmp_path), save_top_k=1, every_n_train_steps=4, async_save=True,
                                 durability=FailSecond())
    with pytest.raises(CommitError, match="volume commit failed"):
        fit("lightning.pytorch", callback)
    # The first save (step 4) stays: its removal was queued after the failed save and never ran.
    assert CheckpointManager(str(tmp_path)).resolve().step in (4, 8)
    assert os.path.isdir(tmp_path / "epoch=0-step=4.ckpt")
