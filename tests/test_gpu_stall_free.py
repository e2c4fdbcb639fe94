"""Stall-free saves on a GPU: the side-stream snapshot and Lightning's DeepSpeedStrategy with async saves.

These need CUDA (and DeepSpeed's GPU path); they skip elsewhere. They were run on one NVIDIA H200
(benchmarks/gpu/stall_free.py runs them first; docs/GPU.md has the outcome). Their CPU counterparts,
in .ci/run, are tests/test_overlap.py and tests/test_deepspeed_async.py.
"""

from __future__ import annotations

import io
import os

import pytest
import torch

from ckptmgr import CheckpointManager
from ckptmgr.async_save import AsyncCheckpointer
from ckptmgr.verify import Status, verify_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_side_stream_snapshot_keeps_the_steps_bytes_and_allocates_no_device_memory(run_dir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.BatchNorm1d(4096),
                                torch.nn.Linear(4096, 4096)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        model(torch.randn(512, 4096, device="cuda")).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    with CheckpointManager(run_dir, torch_crc32=True) as manager, AsyncCheckpointer(manager) as saver:
        saver.save(state, step=1)  # allocates the pinned buffers
        saver.wait()
        step()
        torch.cuda.synchronize()
        expected = torch_bytes(state)  # device storages are recorded as cuda:0, as in the snapshot's file
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        saver.save(state, step=2)
        assert torch.cuda.max_memory_allocated() == before == torch.cuda.memory_allocated()
        step()  # BatchNorm statistics in the forward, then the optimizer step: both wait for the copy
        model[0].weight.data.mul_(2)
        checkpoint = saver.wait()
    with open(checkpoint.load_path, "rb") as f:
        assert f.read() == expected


def lightning_deepspeed_fit(dirpath: str, reference: str, *, stage: int, async_save: bool, max_steps: int,
                            ckpt_path: str | None = None):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from ckptmgr.lightning import ManagedCheckpoint

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])

        def training_step(self, batch, batch_idx):
            return self.net(batch).float().pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(256, 1024), batch_size=32)

    class DeepSpeedsOwnSave(pl.Callback):
        """Just before each managed save, DeepSpeed's own save of the same state (for byte comparison)."""

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step % 2 == 0:
                trainer.strategy.deepspeed_engine.save_checkpoint(
                    os.path.join(reference, f"step{trainer.global_step}"), tag="checkpoint")

    callbacks = [DeepSpeedsOwnSave(), ManagedCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=-1,
                                                         async_save=async_save)]
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=DeepSpeedStrategy(stage=stage),
                         precision="bf16-mixed", max_steps=max_steps, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)
    trainer.fit(Model(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_async_saves_deepspeeds_bytes_and_resumes(tmp_path, stage):
    pytest.importorskip("deepspeed")
    run, reference = str(tmp_path / "run"), str(tmp_path / "reference")
    lightning_deepspeed_fit(run, reference, stage=stage, async_save=True, max_steps=6)
    manager = CheckpointManager(run)
    assert [c.step for c in manager.checkpoints() if c.status == "valid"] == [6, 4, 2]
    for step in (2, 4, 6):
        ours = os.path.join(run, f"epoch=0-step={step}.ckpt", "checkpoint")
        theirs = os.path.join(reference, f"step{step}", "checkpoint")
        optimizer_shards = sorted(n for n in os.listdir(theirs) if "optim_states" in n)
        assert optimizer_shards
        for name in optimizer_shards:  # model_states hold Lightning's client state, which differs
            with open(os.path.join(ours, name), "rb") as a, open(os.path.join(theirs, name), "rb") as b:
                assert a.read() == b.read(), (step, name)
        assert verify_checkpoint(os.path.join(run, f"epoch=0-step={step}.ckpt")).status is Status.VALID
    resumed = lightning_deepspeed_fit(run, reference, stage=stage, async_save=True, max_steps=8,
                                      ckpt_path=os.path.join(run, "epoch=0-step=6.ckpt"))
    assert resumed.global_step == 8 and CheckpointManager(run).resolve().step == 8
