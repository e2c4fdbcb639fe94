"""Overlapped snapshots: the save returns while the copy runs, and the persisted bytes are the step's bytes.

Every test writes the saved state in place right after ``save`` returns, while the copy is still running
(asserted), in one of the ways training does, and checks the committed file byte for byte against
``torch.save`` of the state taken before the write.
"""

from __future__ import annotations

import io
import os
import threading

import pytest
import torch

from ckptmgr import CheckpointManager
from ckptmgr.async_save import AsyncCheckpointer
from ckptmgr.snapshot import SnapshotBuffers, SnapshotError

WIDTH = 3072  # ~19M parameters: with AdamW about 230 MB of state, so the copy takes tens of milliseconds


class Training:
    """A model with a BatchNorm, AdamW with its learning rate in a tensor, and a scheduler."""

    def __init__(self, width: int = WIDTH):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width),
                                         torch.nn.Linear(width, width))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=torch.tensor(1e-3))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 0.5 ** step)
        self.width = width
        self.step()

    def forward_backward(self) -> None:
        self.model(torch.randn(8, self.width)).pow(2).mean().backward()

    def step(self) -> None:
        self.forward_backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_in_place(training: Training, how: str) -> None:
    """One way training writes the saved tensors, issued while the copy runs."""
    first, norm = training.model[0], training.model[1]
    if how == "optimizer-step":
        training.step()
    elif how == "zero-grad-into-a-saved-buffer":  # grads that live in saved tensors' storage
        first.weight.grad = first.bias.new_zeros(first.weight.shape)
        training.optimizer.state[first.weight]["exp_avg"].zero_()
    elif how == "batchnorm-forward":  # running statistics are updated by the next forward
        training.forward_backward()
    elif how == "lr-scheduler":  # the learning rate is a tensor the scheduler fills in place
        training.scheduler.step()
    elif how == "write-through-data":  # .data has its own version counter: only the guard sees it
        first.weight.data.mul_(3)
    elif how == "buffer-update":
        norm.running_var.fill_(7.0)
    else:
        raise AssertionError(how)


WRITES = ["optimizer-step", "zero-grad-into-a-saved-buffer", "batchnorm-forward", "lr-scheduler",
          "write-through-data", "buffer-update"]


@pytest.mark.parametrize("how", WRITES)
def test_persisted_bytes_are_the_steps_bytes_under_in_place_writes(run_dir, how):
    training = Training()
    expected = torch_bytes(training.state())
    # torch_crc32: torch.save's own zip CRCs, so the file is comparable with torch.save's bytes
    with CheckpointManager(run_dir, torch_crc32=True) as manager, AsyncCheckpointer(manager) as saver:
        saver.save(training.state(), step=1)
        snapshot = saver.snapshots[-1]
        assert not snapshot._copied.done(), "the save returned only after the copy: nothing overlapped"
        write_in_place(training, how)
        assert torch_bytes(training.state()) != expected  # the write happened
        checkpoint = saver.wait()
    with open(checkpoint.load_path, "rb") as f:
        assert f.read() == expected


def test_a_save_with_overlap_off_returns_after_the_copy(run_dir):
    training = Training()
    with CheckpointManager(run_dir) as manager, AsyncCheckpointer(manager, overlap=False) as saver:
        saver.save(training.state(), step=1)
        assert saver.snapshots[-1]._copied.done()


def test_the_snapshot_of_a_state_is_what_torch_save_writes_with_views_and_parameters():
    shared = torch.arange(12.0)
    state = {"a": shared[:4], "b": shared[4:].view(2, 4), "p": torch.nn.Parameter(torch.ones(3)),
             "empty": torch.empty(0), "again": torch.empty(0), "same": None, "meta": {"x": [1, (2, "s")]}}
    state["same"] = state["a"]
    copy = SnapshotBuffers().snapshot(state)
    assert torch_bytes(copy) == torch_bytes(state)
    assert copy["a"].untyped_storage().data_ptr() == copy["b"].untyped_storage().data_ptr()
    assert copy["a"].untyped_storage().data_ptr() != shared.untyped_storage().data_ptr()


def test_an_unseen_write_with_the_guard_off_fails_the_save_and_commits_nothing(run_dir):
    training = Training()
    with CheckpointManager(run_dir, keep_last=None) as manager:
        with AsyncCheckpointer(manager, guard=False) as saver:
            saver.save(training.state(), step=1)
            saver.wait()
            saver.save(training.state(), step=2)
            assert not saver.snapshots[-1]._copied.done()
            training.model[2].bias.data.add_(1)  # not a torch.optim step: no hook waits
            with torch.no_grad():
                training.model[0].weight.add_(1)  # its version counter moves while the copy runs
            with pytest.raises(SnapshotError, match="written in place while being snapshotted: /model/0.weight"):
                saver.wait()
        assert {c.step for c in manager.checkpoints()} == {1} and manager.resolve().step == 1


def test_a_write_from_another_thread_is_caught_by_the_version_counters(run_dir):
    """The guard sees the training thread; a write from elsewhere tears the copy, and that is detected."""
    training = Training()
    with CheckpointManager(run_dir, keep_last=None) as manager, AsyncCheckpointer(manager) as saver:
        saver.save(training.state(), step=1)
        assert not saver.snapshots[-1]._copied.done()
        writer = threading.Thread(target=lambda: training.model[1].running_mean.add_(1))
        writer.start()
        writer.join()
        with pytest.raises(SnapshotError, match="running_mean"):
            saver.wait()
        assert manager.checkpoints() == []


def test_the_guard_leaves_no_dispatch_mode_behind(run_dir):
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    training = Training(width=64)
    with CheckpointManager(run_dir) as manager, AsyncCheckpointer(manager) as saver:
        for step in range(1, 4):
            saver.save(training.state(), step=step)
            training.step()  # the optimizer's pre-hook releases the writers and pops the guard
            assert _get_current_dispatch_mode() is None
        saver.save(training.state(), step=4)
        training.model[1].running_mean.add_(1)  # released from inside the guard's own dispatch
        saver.wait()  # pops what dispatch could not
        assert _get_current_dispatch_mode() is None


# -- under Lightning: automatic and manual optimization, accumulation, mixed precision ----------------------
def lightning_module(manual: bool):
    import lightning.pytorch as pl

    class WithNorm(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = not manual
            # ~2M parameters (25 MB with AdamW): each copy still runs when the next step starts
            self.net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.BatchNorm1d(1024),
                                           torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1))

        def training_step(self, batch, batch_idx):
            loss = self.net(batch).pow(2).mean()
            if not manual:
                return loss
            optimizer = self.optimizers()
            optimizer.zero_grad(set_to_none=False)
            self.manual_backward(loss)
            optimizer.step()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self):
            generator = torch.Generator().manual_seed(1)
            return torch.utils.data.DataLoader(torch.randn(96, 256, generator=generator), batch_size=8)

    return WithNorm


def fit_lightning(dirpath: str, *, async_save: bool, manual: bool, accumulate: int, precision: str) -> None:
    import lightning.pytorch as pl

    from ckptmgr.lightning import ManagedCheckpoint

    callback = ManagedCheckpoint(dirpath=dirpath, every_n_train_steps=1, save_top_k=-1, async_save=async_save)
    precision_options: dict = {"precision": precision}
    if precision == "16-mixed-grad-scaler":  # Lightning picks bf16 on CPU; AMP's scaler is asked for by name
        from lightning.pytorch.plugins.precision import MixedPrecision

        precision_options = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    trainer = pl.Trainer(max_steps=6, callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                         accumulate_grad_batches=1 if manual else accumulate, **precision_options)
    torch.manual_seed(0)
    trainer.fit(lightning_module(manual)())


@pytest.mark.parametrize("manual,accumulate,precision", [
    (False, 1, "32-true"), (True, 1, "32-true"), (False, 2, "32-true"), (False, 1, "bf16-mixed"),
    (False, 1, "16-mixed-grad-scaler")],
    ids=["automatic", "manual-optimization", "accumulate-2", "bf16-mixed", "amp-grad-scaler"])
def test_lightning_async_checkpoints_equal_the_sync_ones(tmp_path, manual, accumulate, precision):
    """A save after every step, so each snapshot's copy races the next step's forward (BatchNorm) and step."""
    for mode in ("sync", "async"):
        fit_lightning(str(tmp_path / mode), async_save=mode == "async", manual=manual, accumulate=accumulate,
                      precision=precision)
    names = sorted(n for n in os.listdir(tmp_path / "sync") if n.endswith(".ckpt"))
    assert len(names) == 6 and names == sorted(n for n in os.listdir(tmp_path / "async") if n.endswith(".ckpt"))
    for name in names:
        sync = torch.load(tmp_path / "sync" / name, weights_only=False)
        background = torch.load(tmp_path / "async" / name, weights_only=False)
        assert sync["global_step"] == background["global_step"]
        for key, value in sync["state_dict"].items():
            assert torch.equal(value, background["state_dict"][key]), (name, key)
        for index, state in sync["optimizer_states"][0]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, background["optimizer_states"][0]["state"][index][key]), (name, key)
