"""ManagedCheckpoint: Lightning's ModelCheckpoint, with every save committed by ckptmgr.

Every argument of ``ModelCheckpoint`` keeps its meaning (names, top-k, triggers,
``save_last`` including ``"link"``, version counter); what changes is how bytes
reach the disk:

- each save is staged beside its final name and published by the manager's
  commit protocol (hash, fsync, manifest last, rename, durability hook);
  all ranks write into the same staging directory (DeepSpeed shards too) and
  global rank 0 publishes after a barrier;
- a checkpoint is a directory named as Lightning would name the file
  (``epoch=0-step=100.ckpt/``) holding ``checkpoint.pt`` (or DeepSpeed's
  layout); ``ManagedCheckpointIO`` lets ``trainer.fit(ckpt_path=...)``,
  ``ckpt_path="best"`` and ``"last"`` load it, verified;
- ``last`` is an atomic alias, never a second full write;
- removals (top-k) are crash-safe deletions that never touch the newest;
- the RNG states of every rank travel in the checkpoint, for exact resume.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from ..manager import PAYLOAD_NAME, CheckpointManager
from ..storage import DurabilityHook
from ..verify import Status, has_manifest, verify_checkpoint
from . import _compat, rng

if TYPE_CHECKING:
    from ..deepspeed import ShardHasher  # imported when used: it is the DeepSpeed-only path

log = logging.getLogger(__name__)

STATE_KEY = "ckptmgr"


class _ManagedCheckpointMixin:
    """The behaviour; combined with a namespace's ModelCheckpoint by ``_compat``."""

    def __init__(
        self,
        *args: Any,
        durability: DurabilityHook | None = None,
        durability_timeout_s: float = 600.0,
        config_fingerprint: str | None = None,
        async_save: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.async_save = async_save
        self._async: Any = None  # an AsyncCheckpointer on global rank 0 when async_save is on
        self._ckptmgr_options = {"durability": durability, "durability_timeout_s": durability_timeout_s,
                                 "config_fingerprint": config_fingerprint}
        self.manager: CheckpointManager | None = None
        self.save_seconds: list[float] = []  # wall time of each save, for stop decisions
        self._last_only: str | None = None  # a checkpoint saved only so that `last` has a target
        self._rng_to_restore: list[dict[str, Any]] | None = None

    # -- lifecycle --------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _compat.specialise(self, trainer, _ManagedCheckpointMixin, "callbacks.ModelCheckpoint")
        super().setup(trainer, pl_module, stage)  # type: ignore[misc]
        if trainer.is_global_zero and self.manager is None and self.dirpath is not None:
            self.manager = CheckpointManager(self.dirpath, keep_last=None, last_alias=None, **self._ckptmgr_options)
        if not _is_deepspeed(trainer.strategy):
            from .io import ManagedCheckpointIO

            current = trainer.strategy.checkpoint_io
            if not isinstance(current, ManagedCheckpointIO):
                trainer.strategy.checkpoint_io = ManagedCheckpointIO(current)
        elif self.async_save:
            log.warning("[ckptmgr] async_save is not available with DeepSpeed (its engine writes the shards "
                        "itself); saving synchronously")
            self.async_save = False
        if self.async_save and self.manager is not None and self._async is None:
            from ..async_save import AsyncCheckpointer

            self._async = AsyncCheckpointer(self.manager)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)  # type: ignore[misc]
        if self._async is not None:
            self._async.wait()  # the last save is committed (or its error raised) before fit returns

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._async is not None:
            self._async.close()
            self._async = None
        if self.manager is not None:
            self.manager.close()

    def _in_order(self, job: Any) -> None:
        """Run a manager operation now, or, with async saves, after the save in flight commits."""
        if self._async is not None:
            self._async.submit(job)
        else:
            job()

    # -- saving -----------------------------------------------------------
    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        started = time.monotonic()
        deepspeed = _is_deepspeed(trainer.strategy)
        handle = None
        staging_path = None
        layout = _layout(trainer)
        if trainer.is_global_zero:
            assert self.manager is not None
            handle = self.manager.begin(
                step=trainer.global_step, epoch=trainer.current_epoch, name=os.path.basename(filepath),
                kind="deepspeed" if deepspeed else "lightning", load_path="." if deepspeed else PAYLOAD_NAME,
                world_size=trainer.world_size, layout=layout,
                metadata={"weights_only": bool(self.save_weights_only)},
            )
            staging_path = handle.path
        staging_path = trainer.strategy.broadcast(staging_path)
        inside = staging_path if deepspeed else os.path.join(staging_path, PAYLOAD_NAME)
        if self._async is not None and handle is not None:
            self._async.wait()  # at most one save in flight; raises the previous one's error
            trainer.strategy.checkpoint_io.async_target = (self._async, self.manager, handle)
        hasher = _shard_hasher(trainer, staging_path, self.manager) if deepspeed else None
        try:
            with hasher or nullcontext():
                trainer.save_checkpoint(inside, self.save_weights_only)  # a collective: every rank writes its part
        except BaseException:
            if handle is not None:
                self.manager.abort(handle)  # type: ignore[union-attr]
            raise
        if hasher is not None:
            # Each rank hashed the files it wrote as each was finished; rank 0 checks all are there and publishes.
            from ..deepspeed import gather_and_commit

            gather_and_commit(self.manager, handle, staging_path, rank=trainer.global_rank,
                              world_size=trainer.world_size, layout=layout, hasher=hasher, replace=True)
        elif handle is not None and self._async is None:
            # Lightning has already applied its version counter: a save onto an
            # existing name means "overwrite", done here as a crash-safe replace.
            self.manager.commit(handle, replace=True)  # type: ignore[union-attr]
        trainer.strategy.barrier("ckptmgr.commit")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        self.save_seconds.append(time.monotonic() - started)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _save_last_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        """`last` is an alias of the newest save: never a second full write ("link" or True alike)."""
        if not self.save_last:
            return
        alias = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        if self._last_global_step_saved != trainer.global_step or not self._last_checkpoint_saved:
            # Nothing saved at this step (save_top_k=0 or a skipped top-k): save one for `last` to name.
            filepath = self.format_checkpoint_name(monitor_candidates)
            self._save_checkpoint(trainer, filepath)
            previous, self._last_only = self._last_only, filepath
        else:
            previous = None
        self.last_model_path = alias
        if trainer.is_global_zero:
            manager, target = self.manager, os.path.basename(self._last_checkpoint_saved)
            assert manager is not None
            self._in_order(lambda: manager.point_last(target, alias=os.path.basename(alias)))
        trainer.strategy.barrier("ckptmgr.last")
        if previous and previous != self._last_checkpoint_saved and previous not in self.best_k_models:
            self._remove_checkpoint(trainer, previous)

    def _remove_checkpoint(self, trainer: Any, filepath: str) -> None:
        if not trainer.is_global_zero or self.manager is None:
            return
        name = os.path.basename(filepath)
        if os.path.dirname(os.path.abspath(filepath)) != self.manager.run_dir:
            return
        if self._last_checkpoint_saved and name == os.path.basename(self._last_checkpoint_saved):
            log.info("[ckptmgr] keeping %s: it is the newest checkpoint", filepath)
            return
        manager = self.manager

        def delete() -> None:  # with async saves: only after the new checkpoint committed
            if os.path.lexists(filepath):
                manager.delete(filepath)

        self._in_order(delete)

    def save_now(self, trainer: Any, reason: str) -> str | None:
        """Save at this step (time budget, preemption) unless this step is already saved."""
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved:
            return self._last_checkpoint_saved
        candidates = self._monitor_candidates(trainer)
        log.info("[ckptmgr] saving at step %s (%s)", trainer.global_step, reason)
        # Through Lightning's own top-k bookkeeping, so retention stays Lightning's.
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        return self._last_checkpoint_saved if self._last_global_step_saved == trainer.global_step else None

    def predicted_save_seconds(self) -> float | None:
        """The slowest recent save (with async saves: its stall plus its background persist)."""
        if not self.save_seconds:
            return None
        persist = max(self._async.persist_seconds[-5:], default=0.0) if self._async is not None else 0.0
        return max(self.save_seconds[-5:]) + persist

    # -- what travels in the checkpoint ------------------------------------
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = {"rng": rng.capture_all_ranks(), "world_size": trainer.world_size,
                                 "saved_unix": time.time()}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(STATE_KEY)
        if not state:
            return
        if state.get("world_size") != trainer.world_size:
            log.warning("[ckptmgr] checkpoint written by %s ranks, resuming on %s: RNG states not restored",
                        state.get("world_size"), trainer.world_size)
            return
        # Restored at the first batch, after Lightning has built its iterators.
        self._rng_to_restore = state["rng"]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._async is not None:
            self._async.check()  # a background save that failed surfaces at the next step
        if self._rng_to_restore is not None:
            rng.restore(self._rng_to_restore[trainer.global_rank])
            self._rng_to_restore = None


def _shard_hasher(trainer: Any, staging_path: str, manager: CheckpointManager | None) -> ShardHasher:
    from ..deepspeed import ShardHasher

    return ShardHasher(trainer.strategy.deepspeed_engine, staging_path, manager.storage if manager else None)


def _is_deepspeed(strategy: Any) -> bool:
    return type(strategy).__name__ == "DeepSpeedStrategy" or hasattr(strategy, "deepspeed_engine")


def _layout(trainer: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {"strategy": type(trainer.strategy).__name__}
    config = getattr(trainer.strategy, "config", None)
    if isinstance(config, dict) and "zero_optimization" in config:
        from ..deepspeed import DEFAULT_TAG, expected_shards

        stage = int(config["zero_optimization"].get("stage", 0))
        layout.update(zero_stage=stage, tag=DEFAULT_TAG, dp_world_size=trainer.world_size)
        if stage >= 1:
            bf16 = bool((config.get("bf16") or {}).get("enabled", False))
            layout["shards"] = expected_shards(DEFAULT_TAG, trainer.world_size, stage, bf16=bf16)
    return layout


def is_managed(path: str) -> bool:
    return os.path.isdir(path) and has_manifest(path)


def verified_load_path(path: str) -> str:
    """For a managed checkpoint directory, verify it and return the file to load."""
    from ..errors import InvalidCheckpointError

    result = verify_checkpoint(os.path.realpath(path))
    if result.status is not Status.VALID:
        raise InvalidCheckpointError(path, f"refusing to load: {result.reason}")
    assert result.manifest is not None
    real = os.path.realpath(path)
    return real if result.manifest.load_path == "." else os.path.join(real, result.manifest.load_path)


class _ManagedMeta(type):
    """``isinstance(x, ManagedCheckpoint)`` holds before and after the namespace specialisation."""

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, _ManagedCheckpointMixin)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, _ManagedCheckpointMixin)


ManagedCheckpoint = _ManagedMeta("ManagedCheckpoint",
                                 (_ManagedCheckpointMixin, *_compat.bases("callbacks.ModelCheckpoint")),
                                 {"__module__": __name__, "__doc__": __doc__})
