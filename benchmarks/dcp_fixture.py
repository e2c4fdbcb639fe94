"""FSDP2 on 2 ranks (torchrun, CPU/gloo or GPU/nccl): DCP saves side by side, managed and plain.

    torchrun --standalone --nproc_per_node 2 benchmarks/dcp_fixture.py OUT WIDTH REPS

A model of 8 Linear(WIDTH, WIDTH) layers, sharded with ``fully_shard``, one AdamW step. Then, REPS times
in turn: ``dcp.save`` into a fresh directory vs ``ckptmgr.dcp.save``; ``dcp.async_save`` vs
``ckptmgr.dcp.async_save`` (the stall: until the call returns; then the time until the future resolves).
Every rank waits at a barrier before each timing, each side removes its previous output before its
timing starts, and the order alternates between repetitions. Rank 0 prints ``RESULT {json}`` with
the medians. The last managed checkpoint stays in OUT/run for the export benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

from ckptmgr import CheckpointManager
from ckptmgr import dcp as managed_dcp


def build(width: int, device: torch.device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(8)]).to(device)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width, device=device)).pow(2).mean().backward()
    optimizer.step()
    return model, optimizer


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def main() -> None:
    out, width, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cuda = torch.cuda.is_available()
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, optimizer = build(width, device)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    # No retention inside the timings: each side removes its previous output before its own timing starts.
    manager = CheckpointManager(os.path.join(out, "run"), keep_last=None, last_alias=None)
    plain = os.path.join(out, "plain")
    samples: dict[str, list[float]] = {k: [] for k in ("dcp.save", "ckptmgr.dcp.save", "dcp.async_save stall",
                                                       "ckptmgr.dcp.async_save stall", "dcp.async_save total",
                                                       "ckptmgr.dcp.async_save total")}
    step = 0

    def fresh_plain() -> None:
        if rank == 0:
            shutil.rmtree(plain, ignore_errors=True)
        dist.barrier()

    def fresh_managed() -> None:
        if rank == 0:
            for checkpoint in manager.checkpoints(quick=True):
                manager.delete(checkpoint.name, force=True)
        dist.barrier()

    def plain_save() -> None:
        fresh_plain()
        samples["dcp.save"].append(timed(lambda: dcp.save(state, checkpoint_id=plain)))

    def managed_save() -> None:
        nonlocal step
        fresh_managed()
        step += 1
        samples["ckptmgr.dcp.save"].append(timed(lambda s=step: managed_dcp.save(state, manager, step=s)))

    def plain_async() -> None:
        fresh_plain()
        record_async("dcp.async_save", lambda: dcp.async_save(state, checkpoint_id=plain))

    def managed_async() -> None:
        nonlocal step
        fresh_managed()
        step += 1
        record_async("ckptmgr.dcp.async_save", lambda s=step: managed_dcp.async_save(state, manager, step=s))

    def record_async(name: str, start) -> None:
        dist.barrier()
        t0 = time.perf_counter()
        future = start()
        stall = time.perf_counter() - t0
        future.result()
        dist.barrier()
        samples[f"{name} stall"].append(stall)
        samples[f"{name} total"].append(time.perf_counter() - t0)

    for rep in range(reps):  # the order alternates, so neither side always follows the other's writes
        order = [plain_save, managed_save, plain_async, managed_async]
        for run in (order if rep % 2 == 0 else [managed_save, plain_save, managed_async, plain_async]):
            run()
    fresh_plain()
    plain_save()  # the size of what one save writes, and the managed one kept for the export benchmark
    samples["dcp.save"].pop()
    nbytes = sum(os.path.getsize(os.path.join(plain, n)) for n in os.listdir(plain)) if rank == 0 else 0
    if rank == 0:
        medians = {k: statistics.median(v) for k, v in samples.items()}
        print("RESULT " + json.dumps({"width": width, "reps": reps, "world_size": dist.get_world_size(),
                                      "device": torch.cuda.get_device_name() if cuda else "cpu",
                                      "checkpoint_bytes": nbytes, "medians": medians,
                                      "samples": samples}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The result is printed and every rank has left its process group; gloo's C++ teardown can still abort
    # at interpreter exit under load (SIGABRT, "terminate called without an active exception"): skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
