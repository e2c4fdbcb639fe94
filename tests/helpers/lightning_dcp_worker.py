"""A Lightning run on 2 CPU processes (gloo) with ModelParallelStrategy (FSDP2), its DCP saves managed.

    lightning_dcp_worker.py OUT MAX_STEPS [--resume]

The model shards itself with ``fully_shard`` (as torchtitan does); the strategy saves distributed
checkpoints (its default): every rank writes its shard through DCP. ManagedCheckpoint saves every 2 steps
into OUT/checkpoints; ``--resume`` starts from what ``resume_checkpoint`` picks there. Lightning launches
the second process by running this script again. Rank 0 prints ``REPORT {json}``.

FSDPStrategy (FSDP1) needs an accelerator: benchmarks/gpu/lightning_fsdp.py runs it on GPUs.
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from ckptmgr.lightning import ManagedCheckpoint, resume_checkpoint


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
        self.started_at: int | None = None

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def on_train_start(self):
        self.started_at = self.trainer.global_step

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        data = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(data, batch_size=4)


def main() -> None:
    out, max_steps = sys.argv[1], int(sys.argv[2])
    resume = "--resume" in sys.argv
    dirpath = os.path.join(out, "checkpoints")
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    callback = ManagedCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        limit_val_batches=0)
    checkpoint = resume_checkpoint(dirpath) if resume else None
    model = Model()
    trainer.fit(model, ckpt_path=checkpoint.path if checkpoint else None)
    if trainer.is_global_zero:
        print("REPORT " + json.dumps({"started_at": model.started_at, "global_step": trainer.global_step,
                                      "resumed_from": checkpoint.name if checkpoint else None}),
              flush=True)


if __name__ == "__main__":
    main()
