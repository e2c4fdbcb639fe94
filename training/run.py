"""One invocation of training: resume (verified), train within the budget, save, summarise.

The run directory is ``{output_dir}/runs/{run_name}``. ``resume=False`` starts
fresh without deleting anything: an existing run directory is renamed to
``{run_name}.superseded-<UTC time>`` first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from ckptmgr import CheckpointManager, UsageError, config_fingerprint
from ckptmgr.errors import from_os_error
from ckptmgr.lightning import ManagedCheckpoint, Preemption, TimeBudget, parse_duration, resume_checkpoint
from ckptmgr.lightning.resume import global_rank as _global_rank
from ckptmgr.naming import NAME_MAX, stem
from ckptmgr.storage import DurabilityHook

from .model import TinyTransformer

log = logging.getLogger(__name__)

EXIT_COMPLETE = 0
EXIT_RESUME_NEEDED = 75  # EX_TEMPFAIL: stopped on time budget or signal; run again to continue


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    output_dir: str = "outputs"
    run_name: str = "demo"
    max_steps: int = 200
    max_epochs: int = -1
    save_step: int = 50
    keep_last: int = 3
    time_budget: str | None = None
    budget_margin_s: float = 60.0
    grace_s: float = 30.0
    train_bsz: int = 16
    grad_acc_steps: int = 1
    strategy: str = "auto"
    deepspeed_stage: int = 2
    devices: int = 1
    accelerator: str = "auto"
    precision: str = "32-true"
    seed: int = 42
    lr: float = 3e-3
    width: int = 64
    layers: int = 2
    resume: bool = True
    allow_fresh: bool = False
    force_config: bool = False
    progress_bar: bool = True
    async_save: bool = False
    checkpointing: str = "managed"  # "lightning": plain ModelCheckpoint, for side-by-side benchmarks only

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, "runs", self.run_name)

    def fingerprint(self) -> str:
        """What makes two invocations the same experiment (not budget, devices or resume flags)."""
        keys = ("max_epochs", "train_bsz", "grad_acc_steps", "seed", "lr", "width", "layers", "precision")
        return config_fingerprint({k: getattr(self, k) for k in keys})


@dataclass
class RunResult:
    run_dir: str
    resumed_from: str | None
    start_step: int
    end_step: int
    max_steps: int
    complete: bool
    stop_reason: str  # for people: "time budget", "signal 2 (checkpoint saved)", ...
    checkpoints_written: int
    save_seconds: float
    wall_seconds: float
    global_rank: int = 0
    # For programs: "complete", "time_budget", "preempted" (SIGTERM/SIGINT: run the same input again),
    # "cancelled" (SIGUSR1: a person stopped it); the signal and whether its checkpoint was saved.
    stop: str = "complete"
    signal: int | None = None
    checkpoint_saved: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_COMPLETE if self.complete else EXIT_RESUME_NEEDED

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def supersede(run_dir: str) -> str | None:
    """Move an existing run directory aside (never delete it); return where it went.

    The aside name is ``{run_name}.superseded-<UTC time>``, shortened (with a hash of the whole name) where
    that would pass the 255-byte limit of a file name.
    """
    if not os.path.exists(run_dir) or not os.listdir(run_dir):
        return None
    parent, name = os.path.split(os.path.abspath(run_dir))
    suffix = f".superseded-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if len(os.fsencode(name + suffix)) > NAME_MAX:
        name = stem(name)[: NAME_MAX - len(suffix) - 17] + "~" + config_fingerprint(name)[:16]
    aside = os.path.join(parent, name + suffix)
    os.rename(run_dir, aside)
    log.warning("[ckptmgr] --no-resume: moved %s to %s (nothing deleted)", run_dir, aside)
    return aside


def take_the_run(config: TrainConfig) -> CheckpointManager | None:
    """The writer lock, before anything is read, moved or trained (global rank 0 only: other ranks are this
    writer's processes). A second writer is refused here, before it trains. ``--no-resume`` moves the old run
    aside only while holding its lock, then takes the fresh directory's."""
    if _global_rank() != 0:
        return None
    if os.path.lexists(config.run_dir) and not os.path.isdir(config.run_dir):
        raise UsageError(config.run_dir, "the run directory path exists and is not a directory")
    writer = CheckpointManager(config.run_dir, keep_last=None, last_alias=None).open()
    if config.resume:
        return writer
    try:
        moved = supersede(config.run_dir)
    except OSError as exc:
        writer.close()
        raise from_os_error(config.run_dir, "moving the old run aside", exc) from exc
    if moved is None:
        return writer
    fresh = CheckpointManager(config.run_dir, keep_last=None, last_alias=None).open()
    writer.close()  # the old run's lock, now in the directory set aside
    return fresh


def train(config: TrainConfig, *, durability: DurabilityHook | None = None,
          started_at: float | None = None) -> RunResult:
    started_at = time.time() if started_at is None else started_at
    strategy = _strategy(config)  # refused before the run directory is touched
    writer = take_the_run(config) if config.checkpointing == "managed" else None
    try:
        return _train(config, strategy, durability, started_at)
    finally:
        if writer is not None:
            writer.close()


def _train(config: TrainConfig, strategy: Any, durability: DurabilityHook | None, started_at: float) -> RunResult:
    if config.checkpointing != "managed" and not config.resume:
        supersede(config.run_dir)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    found = None
    if config.checkpointing == "managed":
        found = resume_checkpoint(config.run_dir, allow_fresh=config.allow_fresh,
                                  config_fingerprint=config.fingerprint(), force_config=config.force_config)
    model = TinyTransformer(width=config.width, layers=config.layers, lr=config.lr, batch_size=config.train_bsz)
    checkpoint_args = dict(dirpath=config.run_dir, every_n_train_steps=config.save_step, monitor="step", mode="max",
                           save_top_k=config.keep_last, save_last=True)
    if config.checkpointing == "lightning":
        checkpoint: Any = TimedModelCheckpoint(**checkpoint_args)
    else:
        checkpoint = ManagedCheckpoint(**checkpoint_args, durability=durability,
                                       config_fingerprint=config.fingerprint(), async_save=config.async_save)
    callbacks: list[Any] = [checkpoint, Preemption(grace_s=config.grace_s), _SaveAtEnd()]
    budget = None
    if config.time_budget is not None:
        budget = TimeBudget(parse_duration(config.time_budget), margin_s=config.budget_margin_s,
                            started_at=started_at)
        callbacks.append(budget)
    trainer = pl.Trainer(
        default_root_dir=config.output_dir, max_steps=config.max_steps, max_epochs=config.max_epochs,
        accumulate_grad_batches=config.grad_acc_steps, strategy=strategy, devices=config.devices,
        accelerator=config.accelerator, precision=config.precision, callbacks=callbacks, logger=False,
        enable_progress_bar=config.progress_bar, enable_model_summary=False, deterministic=True,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    start_step = found.step if found else 0
    trainer.fit(model, ckpt_path=found.load_path if found else None)
    preemption = next(c for c in callbacks if isinstance(c, Preemption))
    return RunResult(
        run_dir=config.run_dir, resumed_from=found.path if found else None, start_step=start_step,
        end_step=trainer.global_step, max_steps=config.max_steps, complete=_complete(trainer, config),
        stop_reason=_stop_reason(trainer, config, budget, preemption),
        checkpoints_written=len(checkpoint.save_seconds), save_seconds=round(sum(checkpoint.save_seconds), 3),
        wall_seconds=round(time.time() - started_at, 3), global_rank=trainer.global_rank,
        stop=_stop(trainer, config, budget, preemption), signal=preemption.received,
        checkpoint_saved=preemption.outcome == "saved" or trainer.global_step == _last_saved_step(checkpoint),
    )


def _strategy(config: TrainConfig) -> Any:
    if config.strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=config.deepspeed_stage)
    if config.strategy == "fsdp":
        if config.accelerator == "cpu" or not torch.cuda.is_available():
            raise UsageError(None, "--strategy fsdp needs GPUs (Lightning's FSDPStrategy refuses the CPU)",
                             hint="use --strategy ddp on CPU")
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(state_dict_type="sharded")  # every rank saves its shard through DCP
    if config.strategy == "ddp" and not torch.cuda.is_available():
        return "ddp"  # gloo on CPU
    return config.strategy


def _complete(trainer: pl.Trainer, config: TrainConfig) -> bool:
    if config.max_steps > 0 and trainer.global_step >= config.max_steps:
        return True
    return config.max_epochs > 0 and trainer.current_epoch >= config.max_epochs


def _stop(trainer: pl.Trainer, config: TrainConfig, budget: Any, preemption: Any) -> str:
    if preemption.stop is not None:
        return preemption.stop
    if budget is not None and budget.stopped:
        return "time_budget"
    return "complete" if _complete(trainer, config) else "max_epochs"


def _last_saved_step(checkpoint: Any) -> int | None:
    return getattr(checkpoint, "_last_global_step_saved", None) if checkpoint.save_seconds else None


def _stop_reason(trainer: pl.Trainer, config: TrainConfig, budget: Any, preemption: Any) -> str:
    if preemption.outcome is not None:
        return f"signal {preemption.received} (checkpoint {preemption.outcome})"
    if budget is not None and budget.stopped:
        return "time budget"
    if config.max_steps > 0 and trainer.global_step >= config.max_steps:
        return "max_steps"
    return "max_epochs"


class TimedModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's own ModelCheckpoint, timed: the baseline of the save benchmarks (no resume, no ckptmgr)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_seconds: list[float] = []

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        started = time.monotonic()
        super()._save_checkpoint(trainer, filepath)
        self.save_seconds.append(time.monotonic() - started)


class _SaveAtEnd(pl.Callback):
    """A final checkpoint when training ends between periodic saves.

    Saved at the last batch's end, like every other save: a checkpoint taken in
    ``on_train_end`` records the epoch as finished, and a later resume (with a
    larger ``max_steps``) would count one epoch too many.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            self._save(trainer, "end of training")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only when max_epochs ended training: a stop on budget or signal has decided for itself.
        if trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch:
            self._save(trainer, "end of training")

    @staticmethod
    def _save(trainer: pl.Trainer, reason: str) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, ManagedCheckpoint) and trainer.global_step > 0:
                callback.save_now(trainer, reason=reason)


def checkpoints_in(run_dir: str) -> int:
    manager = CheckpointManager(run_dir)
    return sum(1 for c in manager.checkpoints(quick=True) if c.result is not None and c.result.valid)
