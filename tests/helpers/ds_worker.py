"""A DeepSpeed ZeRO run on CPU (gloo) for the tests; launch with torchrun.

    ds_worker.py STAGE OUT    train 6 steps of a small model, saving managed checkpoints at steps 3 and 6
                              (OUT/run/), a plain DeepSpeed checkpoint (OUT/plain/, tag global_step6), then
                              load the newest managed one into a fresh engine; save once more into OUT/probe/
                              through a ShardHasher; attempt a managed save at step 7 whose fsync fails on
                              rank 1; rank 0 prints a JSON report.
"""

import json
import os
import sys

import deepspeed
import torch

from ckptmgr import CheckpointManager, CkptMgrError
from ckptmgr import deepspeed as managed
from ckptmgr.testing import Fault, FaultyStorage


def engine_for(stage: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.GELU(), torch.nn.LayerNorm(48),
                                torch.nn.Linear(48, 7))
    model.register_buffer("counter", torch.arange(5, dtype=torch.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def params(engine) -> list[torch.Tensor]:
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return [p.detach().clone() for p in engine.module.parameters()]
    return [p.detach().clone() for p in engine.module.parameters()]


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    engine = engine_for(stage)
    manager = CheckpointManager(os.path.join(out, "run"))
    g = torch.Generator().manual_seed(engine.global_rank)
    saved = []
    for step in range(1, 7):
        loss = engine(torch.randn(4, 16, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        if step in (3, 6):
            checkpoint = managed.save(engine, manager, step=step, client_state={"step": step})
            saved.append(checkpoint.path if checkpoint else None)
    engine.save_checkpoint(os.path.join(out, "plain"), tag="global_step6")
    expected = params(engine)

    fresh = engine_for(stage)
    checkpoint, client_state = managed.load(fresh, CheckpointManager(os.path.join(out, "run")))
    restored = params(fresh)
    same = all(torch.equal(a, b) for a, b in zip(expected, restored, strict=True))
    probe = probe_shard_hasher(engine, os.path.join(out, "probe"))
    failed = save_with_failing_rank(engine, manager)
    if engine.global_rank == 0:
        print("REPORT " + json.dumps({"saved": saved, "loaded": checkpoint.path, "step": checkpoint.step,
                                      "client_step": client_state.get("step"), "params_equal": same,
                                      "world_size": engine.world_size, "probe": probe, "failed": failed}),
              flush=True)


def gather(value):
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def probe_shard_hasher(engine, staging: str) -> list:
    """What each rank hashed while the engine was still saving, and every rank's entries afterwards."""
    os.makedirs(staging, exist_ok=True)
    with managed.ShardHasher(engine, staging) as hasher:
        engine.save_checkpoint(staging, tag="checkpoint")
    torch.distributed.barrier()
    unwrapped = "save" not in vars(engine.checkpoint_engine)
    entries = hasher.entries(engine.global_rank, engine.world_size)
    return gather({"as_written": sorted(hasher.hashed_as_written), "unwrapped": unwrapped,
                   "entries": [[e.path, e.size, e.xxh3_128] for e in entries]})


def save_with_failing_rank(engine, manager: CheckpointManager) -> list:
    """A save whose first fsync fails on rank 1: every rank must raise, nothing may be published."""
    if engine.global_rank == 1:  # rank 1 never takes the writer lock: its manager only lends its storage
        manager = CheckpointManager(manager.run_dir, storage=FaultyStorage(Fault(at=1, op="sync_file", action="eio")))
    try:
        managed.save(engine, manager, step=7)
        outcome = "committed"
    except CkptMgrError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    return gather(outcome)


if __name__ == "__main__":
    main()
    # Leave together: a rank exiting while its peer still tears down communication threads can abort
    # the peer ("terminate called without an active exception", seen in CI).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # ZeRO-3 on CPU intermittently aborts in C++ teardown at interpreter exit, after all work is done
    # ("terminate called without an active exception": a thread left joinable). The report is out
    # and every file is committed and fsynced, so leave without running those destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
