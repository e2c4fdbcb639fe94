"""Asynchronous DeepSpeed saves on CPU (gloo, 2 ranks) for the tests; launch with torchrun.

    ds_async_worker.py check STAGE OUT
        at step 3: DeepSpeed's own save into OUT/ref/, then an async managed save into OUT/run/ and at once
        the next step (which writes every saved tensor); then a save whose background fsync fails on rank 1,
        and one more save that must raise that failure on every rank; rank 0 prints a JSON report.
    ds_async_worker.py train STAGE OUT STEPS [KILL_AFTER_SAVE]
        train STEPS steps (resuming from OUT/run/ when it has a checkpoint), an async save every 2 steps;
        with KILL_AFTER_SAVE, SIGKILL the whole job right after that save returned (its persist in
        flight); at the end rank 0 writes the parameters to OUT/final-<rank>.pt.
"""

import json
import os
import signal
import sys

import deepspeed
import torch

from ckptmgr import CheckpointManager, CkptMgrError
from ckptmgr import deepspeed as managed
from ckptmgr.deepspeed_async import AsyncDeepSpeedSaver
from ckptmgr.testing import Fault, FaultyStorage


def engine_for(stage: int):
    torch.manual_seed(0)
    # ~4.4M parameters (about 50 MB of ZeRO state): a persist takes long enough to be killed during it
    model = torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.GELU(), torch.nn.LayerNorm(2048),
                                torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 7))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def train_step(engine, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + engine.global_rank)  # the same batch after a resume
    loss = engine(torch.randn(4, 64, generator=g)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def params(engine) -> list[torch.Tensor]:
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return [p.detach().clone() for p in engine.module.parameters()]
    return [p.detach().clone() for p in engine.module.parameters()]


def gather(value):
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def check(stage: int, out: str) -> None:
    engine = engine_for(stage)
    rank = engine.global_rank
    manager = CheckpointManager(os.path.join(out, "run"), keep_last=None) if rank == 0 else None
    saver = AsyncDeepSpeedSaver(engine, manager)
    for step in range(1, 4):
        train_step(engine, step)
    engine.save_checkpoint(os.path.join(out, "ref"), tag="checkpoint", client_state={"step": 3})  # its own save
    saver.save(step=3, client_state={"step": 3})
    in_flight = saver.saver.busy
    train_step(engine, 4)  # writes every tensor the save snapshotted, while it persists
    committed = saver.wait()

    # A save whose first fsync fails on rank 1 (its own files): raised by the next save on every rank.
    storage = FaultyStorage(Fault(at=1, op="sync_file", action="eio")) if rank == 1 else None
    failing = AsyncDeepSpeedSaver(engine, manager, saver=saver.saver, storage=storage)

    def save_failing() -> str:
        try:
            failing.save(step=5)
            train_step(engine, 5)
            failing.save(step=6)  # raises the failure of step 5's save
            return "no error"
        except CkptMgrError as exc:
            return f"{type(exc).__name__}: {exc}"

    outcome = save_failing()
    try:
        saver.wait()  # the step-6 save never started; nothing in flight
        after = "clean"
    except CkptMgrError as exc:
        after = f"{type(exc).__name__}: {exc}"
    report = {"in_flight": in_flight, "committed": committed.path if committed else None,
              "outcomes": gather(outcome), "after": gather(after)}
    saver.close()
    if rank == 0:
        print("REPORT " + json.dumps(report), flush=True)


def train(stage: int, out: str, steps: int, kill_after_save: int | None) -> None:
    engine = engine_for(stage)
    rank = engine.global_rank
    run_dir = os.path.join(out, "run")
    manager = CheckpointManager(run_dir, keep_last=2) if rank == 0 else None
    start = 0
    if os.path.isdir(run_dir) and CheckpointManager(run_dir).resolve() is not None:
        _, client_state = managed.load(engine, CheckpointManager(run_dir))
        start = int(client_state["step"])
    saver = AsyncDeepSpeedSaver(engine, manager)
    saves = 0
    for step in range(start + 1, steps + 1):
        train_step(engine, step)
        if step % 2 == 0:
            saver.save(step=step, client_state={"step": step})
            saves += 1
            if saves == kill_after_save:
                torch.distributed.barrier()  # both ranks' persists are in flight
                if rank == 0:
                    os.killpg(os.getpgid(0), signal.SIGKILL)
    saver.close()
    final = params(engine)
    if rank == 0:
        torch.save(final, os.path.join(out, f"final-{rank}.pt"))


if __name__ == "__main__":
    if sys.argv[1] == "check":
        check(int(sys.argv[2]), sys.argv[3])
    else:
        train(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else None)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see ds_worker.py: ZeRO-3 on CPU may abort in C++ teardown after all work is done
