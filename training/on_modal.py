"""One invocation of the trainer in a chain on Modal, without importing ``modal``.

``scripts/train/modal_train.py`` declares the Modal app and its functions; their bodies live here, so
that they run the same on Modal, offline with a local directory standing in for the Volume, under the
runtime simulator (``ckptmgr.modal_sim``) and on a GPU machine driven without Modal. What they need
from the platform comes in a *runtime* ``rt``: ``rt.root`` (the Volume's mount), ``rt.volume``
(``commit()``), ``rt.call_id()`` and ``rt.spawn(gpu, **kwargs)``.

- :func:`prepare_run` is the chain's CPU preflight: refuse a second live chain, do the fresh start once,
  resolve and check the config, record the chain;
- :func:`run_invocation` is one GPU invocation: admitted by the chain record, under the writer lease,
  rank 0 here and the other ranks launched beside it, a preemption ending in ``KeyboardInterrupt``, the
  Volume committed before the successor is spawned.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

MAX_INVOCATIONS = 10


class LocalDirectory:
    """Stands in for the Volume locally: data is durable once fsynced (ckptmgr already did)."""

    def commit(self) -> None:
        os.sync()

    def reload(self) -> None:
        pass



def run_dir_for(root: str, lang_pair: str, run_name: str) -> str:
    return os.path.join(root, lang_pair, "runs", run_name)


# -- the function bodies -------------------------------------------------------------
def prepare_run(rt: Any, *, run_name: str, lang_pair: str, fresh: bool, chain: str,
                config: dict[str, Any]) -> dict[str, Any]:
    """The CPU preflight of a chain: refuse a live chain, fresh start once, resolve and check, record the chain."""
    from ckptmgr.lightning import resume_checkpoint
    from ckptmgr.modal import check_no_live_chain, start_chain

    from .run import TrainConfig, supersede

    run_dir = run_dir_for(rt.root, lang_pair, run_name)
    check_no_live_chain(run_dir)
    moved = supersede(run_dir) if fresh else None
    train_config = TrainConfig(output_dir=os.path.join(rt.root, lang_pair), run_name=run_name, **config)
    found = resume_checkpoint(run_dir, quarantine=False, config_fingerprint=train_config.fingerprint())
    start_chain(run_dir, chain)
    rt.volume.commit()
    return {"run_dir": run_dir, "moved_aside": moved, "resume_from": found.path if found else None,
            "resume_step": found.step if found else 0, "chain": chain}


def run_invocation(rt: Any, *, run_name: str, lang_pair: str, chain: str, invocation: int, max_steps: int,
                   save_step: int, time_budget_s: float, auto_continue: bool = False,
                   max_invocations: int = MAX_INVOCATIONS, gpu: str = "", durability: Any = None,
                   **options: Any) -> dict[str, Any]:
    """One invocation of the chain: admitted by the chain record, under the writer lease, trains, continues."""
    from ckptmgr import NotACheckpointError
    from ckptmgr.history import estimate
    from ckptmgr.journal import read_events
    from ckptmgr.modal import ChainConflictError, ChainRecord, VolumeCommit, WriterLease

    from .launch import launch
    from .run import TrainConfig

    run_dir = run_dir_for(rt.root, lang_pair, run_name)
    if not os.path.isdir(run_dir) and invocation > 1:
        raise NotACheckpointError(run_dir, f"invocation {invocation} found no run directory (wrong Volume "
                                           "or run name?)")
    record = ChainRecord.load(run_dir)
    if record is None or record.chain != chain:
        raise ChainConflictError(run_dir, f"this run belongs to chain {record.chain if record else None}, not "
                                          f"{chain}: another `modal run` took it over")
    call_id = rt.call_id()
    continued = record.admit(invocation, call_id)
    if continued is not None:  # a retried input that had already spawned its successor: nothing to do
        return {"invocation": invocation, "already_continued": True, "next_call_id": continued["call_id"],
                "complete": False, "continue_reason": "already continued", "stop": "continued"}
    lease = WriterLease(run_dir, holder=f"chain {chain}")
    lease.acquire()
    record.save()
    rt.volume.commit()  # the lease and the admission are visible before any training
    budget_margin = options.pop("budget_margin_s", 0.0)
    config = TrainConfig(output_dir=os.path.join(rt.root, lang_pair), run_name=run_name, max_steps=max_steps,
                         save_step=save_step, time_budget=str(time_budget_s), budget_margin_s=budget_margin,
                         progress_bar=False, resume=True, **options)
    result = launch(config, durability=durability or VolumeCommit(rt.volume, lease=lease)).as_dict()
    result["invocation"], result["chain"] = invocation, chain
    if result["stop"] == "preempted":
        # Modal restarts an input that ends in KeyboardInterrupt; it resumes from what was just committed.
        record.finish(invocation, "preempted")
        record.save()
        rt.volume.commit()
        raise KeyboardInterrupt(f"preempted at step {result['end_step']}: the same input will resume")
    left = estimate(read_events(run_dir), total_steps=max_steps, time_limit_s=time_budget_s,
                    current_step=result["end_step"])
    result["estimated_invocations_left"] = 0 if result["complete"] else left.invocations_needed
    go_on, why = should_continue(result, invocation, max_invocations)
    result["continue_reason"] = why
    record.finish(invocation, result["stop"])
    if auto_continue and go_on:
        record.invocations[str(invocation)]["spawning"] = True
        record.invocations[str(invocation + 1)] = {"call_id": None, "spawned": None, "spawned_by": invocation}
        record.save()
        rt.volume.commit()  # the successor mounts a Volume with every write of this invocation
        successor = rt.spawn(gpu, run_name=run_name, lang_pair=lang_pair, chain=chain, invocation=invocation + 1,
                             max_steps=max_steps, save_step=save_step, time_budget_s=time_budget_s,
                             auto_continue=True, max_invocations=max_invocations, **_as_train_kwargs(options))
        record.record_spawn(invocation, successor)
        result["next_call_id"] = successor
    else:
        lease.release()
    record.save()
    rt.volume.commit()
    return result


def _as_train_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields back into ``train``'s parameters (its own ones first, the rest in ``options``)."""
    options = dict(options)
    own = {k: options.pop(k) for k in ("strategy", "devices", "precision", "grace_s") if k in options}
    return {**own, "options": options}


def should_continue(result: dict[str, Any], invocation: int, max_invocations: int) -> tuple[bool, str]:
    """Launch another invocation? Only for a clean stop on the time budget with progress made."""
    if result["complete"]:
        return False, "training complete"
    if invocation >= max_invocations:
        return False, f"reached --max-invocations {max_invocations}"
    if result["stop"] != "time_budget":
        return False, f"stopped by {result['stop_reason']}: not continuing automatically"
    if result["end_step"] <= result["start_step"]:
        return False, "no progress in this invocation: not continuing"
    return True, "time budget reached: continuing"


def report(result: dict[str, Any], invocation: int) -> str:
    if result.get("already_continued"):
        return f"[invocation {invocation}] had already continued the chain ({result['next_call_id']})"
    left = result.get("estimated_invocations_left")
    return (f"[invocation {invocation}] steps {result['start_step']} -> {result['end_step']} of {result['max_steps']}"
            f" ({'complete' if result['complete'] else result['stop_reason']}); "
            f"{result['checkpoints_written']} checkpoint(s) this invocation; "
            f"estimated invocations left: {'unknown' if left is None else left}; run {result['run_dir']}")


@contextlib.contextmanager
def interrupts_restart_the_input():
    """A SIGINT (Modal's preemption) anywhere in the body ends as KeyboardInterrupt, never SystemExit(1).

    Lightning turns a KeyboardInterrupt during set-up or restore into ``sys.exit(1)``, which Modal counts
    as a failed attempt (a retry burned); and this process's SIGINT handling is restored on the way out.
    """
    received = []
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    if previous in (signal.SIG_IGN, signal.SIG_DFL, None, signal.default_int_handler):
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except SystemExit as exc:
        if received:
            raise KeyboardInterrupt("interrupted during set-up or restore") from exc
        raise
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


