"""FSDP2 training on CPU (gloo) saving through ckptmgr.dcp; launch with torchrun.

    dcp_worker.py RUN --steps N [--save-every K] [--async] [--dump DIR]
                  [--die-rank R --die-save S --die-item I] [--die-in-commit AT]

Resumes from the newest verified checkpoint in RUN (if any), trains to step N
saving every K steps, and prints ``committed STEP`` on rank 0 as each save is
acknowledged. Data depends only on (step, rank), so a run resumed after a kill
ends bitwise equal to an uninterrupted one. ``--dump DIR`` writes the full
model state (rank 0) at every committed step and at the end (``final.pt``).

Kills, all real SIGKILLs of this process:
  --die-rank R --die-save S --die-item I  rank R dies while DCP writes its file for save S, when DCP asks
                                          for item I (a public planner hook: the file is open, half written);
  --forbid-rehash                         rank 0's storage fails any fsync of a file: every file must have been
                                          hashed and fsynced as it was written, not by the commit;
  --die-in-commit AT                      rank 0 dies at the AT-th storage operation of a commit (publishing
                                          the record, syncing, renaming: ckptmgr.testing.FaultyStorage).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

from ckptmgr import CheckpointManager, NoValidCheckpointError
from ckptmgr import dcp as managed_dcp
from ckptmgr.testing import Fault, FaultyStorage

WIDTH = 256


class DieWhileWriting(DefaultSavePlanner):
    """SIGKILL this process when DCP asks for the ``item``-th item's data: mid-way through writing its file."""

    def __init__(self, item: int):
        super().__init__()
        self.item, self.asked = item, 0

    def resolve_data(self, write_item):
        self.asked += 1
        if self.asked == self.item:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().resolve_data(write_item)


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, WIDTH),
                                torch.nn.GELU(), torch.nn.Linear(WIDTH, 8))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(step * 1000 + rank))


def full_state(model) -> dict:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--async", dest="use_async", action="store_true")
    parser.add_argument("--dump")
    parser.add_argument("--die-rank", type=int)
    parser.add_argument("--die-save", type=int)
    parser.add_argument("--die-item", type=int, default=3)
    parser.add_argument("--die-in-commit", type=int)
    parser.add_argument("--forbid-rehash", action="store_true",
                        help="rank 0's storage fails any fsync of a file: a commit that re-reads what DCP wrote fails")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, optimizer = build()
    storage = None
    if rank == 0 and args.die_in_commit:
        storage = FaultyStorage(Fault(at=args.die_in_commit, action="kill"))
    elif rank == 0 and args.forbid_rehash:
        storage = FaultyStorage(Fault(at=1, op="sync_file", action="eio"))
    manager = CheckpointManager(args.run, keep_last=3, storage=storage)
    start = 0
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        checkpoint = managed_dcp.load(state, manager)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = checkpoint.step
        if rank == 0:
            print(f"resumed {checkpoint.name} {start}", flush=True)
    except NoValidCheckpointError:
        pass
    saves = 0
    for step in range(start + 1, args.steps + 1):
        loss = model(batch(step, rank)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}", flush=True)
        if step % args.save_every:
            continue
        saves += 1
        model_sd, optim_sd = get_state_dict(model, optimizer)
        planner = DieWhileWriting(args.die_item) if (rank == args.die_rank and saves == args.die_save) else None
        state = {"model": model_sd, "optim": optim_sd}
        if args.use_async:
            committed = managed_dcp.async_save(state, manager, step=step, planner=planner).result()
        else:
            committed = managed_dcp.save(state, manager, step=step, planner=planner)
        weights = full_state(model)  # a collective: every rank takes part
        if rank == 0:
            print(f"committed {committed.step}", flush=True)
            if args.dump:
                torch.save(weights, os.path.join(args.dump, f"step{step}.pt"))
    weights = full_state(model)
    if rank == 0 and args.dump:
        torch.save(weights, os.path.join(args.dump, "final.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # As in ds_worker.py: a rank may abort in gloo's C++ teardown at interpreter exit ("terminate called
    # without an active exception", seen under load) after all work is done and reported; leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
