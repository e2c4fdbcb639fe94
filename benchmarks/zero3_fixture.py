"""Write one managed DeepSpeed ZeRO-3 checkpoint of a model of the given width (torchrun, CPU/gloo).

    torchrun --standalone --nproc_per_node 2 benchmarks/zero3_fixture.py OUT WIDTH
"""

import os
import sys

import deepspeed
import torch

from ckptmgr import CheckpointManager
from ckptmgr import deepspeed as managed

out, width = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(8)])
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
    "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9})
loss = engine(torch.randn(2, width)).pow(2).mean()
engine.backward(loss)
engine.step()
managed.save(engine, CheckpointManager(out), step=1)
torch.distributed.barrier()  # leave together (see tests/helpers/ds_worker.py)
torch.distributed.destroy_process_group()
os._exit(0)  # skip DeepSpeed ZeRO-3's C++ teardown, which can abort at exit (see tests/helpers/ds_worker.py)
