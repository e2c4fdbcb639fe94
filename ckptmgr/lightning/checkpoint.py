"""ManagedCheckpoint's behaviour: Lightning's ModelCheckpoint, with every save committed by ckptmgr.

Lightning's own ``ModelCheckpoint`` code decides everything it always decided
(names, ``filename`` templates, the version counter, top-k by monitor,
``every_n_*`` and time triggers, ``save_last``, which checkpoints to remove,
the callback state saved in checkpoints). This mixin replaces only the three
places where bytes reach the disk, through public overridable methods:

- ``_save_checkpoint``: the save is staged in the run's hidden ``.ckptmgr/``
  and published by the manager's commit protocol (hash while written, fsync,
  commit record, rename onto the name Lightning chose, durability hook). A
  single-payload checkpoint is the ``.ckpt`` file itself, byte for byte what
  ``torch.save`` writes; a DeepSpeed checkpoint is DeepSpeed's own directory,
  and a sharded FSDP / ModelParallel checkpoint is Lightning's own DCP directory
  (``.metadata``, ``__R_0.distcp``, ``meta.pt``), every rank's files hashed by
  the rank that wrote them and checked against ``.metadata`` before the commit. ``save_last=True``
  after a save at the same step publishes ``last.ckpt`` as a hard link with its
  own commit record (a real file, no second write; a copy where links are not
  supported).
- ``_link_checkpoint`` (``save_last="link"``): an atomic symlink swap.
- ``_remove_checkpoint``: a crash-safe deletion (to trash, records, then bytes).

The RNG states of every rank travel in the checkpoint, for exact resume.
Which Lightning namespace a class belongs to is decided by the module that
builds it (``ckptmgr.lightning`` or ``ckptmgr.pytorch_lightning``).
"""

# No `from __future__ import annotations` here: LightningCLI and jsonargparse read __init__'s annotations
# as real types (``inspect.signature(ManagedCheckpoint)`` must show what ModelCheckpoint's shows).
import logging
import os
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from weakref import proxy

from .. import aliases, dcp_layout
from ..errors import InvalidCheckpointError, UsageError
from ..manager import CheckpointManager
from ..storage import DurabilityHook
from . import _compat, rng

if TYPE_CHECKING:
    from ..deepspeed import ShardHasher  # imported when used: it is the DeepSpeed-only path

log = logging.getLogger(__name__)

STATE_KEY = "ckptmgr"
_PARENT_NAME = "ModelCheckpoint"


class ManagedCheckpointMixin:
    """The behaviour; combined with one namespace's ModelCheckpoint in ``ckptmgr.lightning`` and
    ``ckptmgr.pytorch_lightning``."""

    def __init__(  # the annotations equal ModelCheckpoint's at run time (LightningCLI reads them)
        self,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        *,
        durability: DurabilityHook | None = None,
        durability_timeout_s: float = 600.0,
        config_fingerprint: str | None = None,
        async_save: bool = False,
    ):
        """Every argument of Lightning's ``ModelCheckpoint``, with its meaning, plus:

        Args:
            durability: called after each publish (a Modal ``Volume.commit()``: see ``ckptmgr.modal``).
            durability_timeout_s: a durability hook that has not returned by then fails the save.
            config_fingerprint: recorded in every checkpoint; a resume under another one is refused.
            async_save: training stalls only while the copy into reused host buffers is issued; the copy
                overlaps the next forward/backward and the optimizer step waits for it (ckptmgr.snapshot);
                writing, hashing, committing, moving ``last`` and removals happen in order in the background; a
                failed save is raised at the next step. Under DeepSpeed every rank does this for its shards
                (ckptmgr.deepspeed_async); under DCP strategies saves stay synchronous.
        """
        super().__init__(  # type: ignore[call-arg]
            dirpath=dirpath, filename=filename, monitor=monitor, verbose=verbose, save_last=save_last,
            save_top_k=save_top_k, save_on_exception=save_on_exception, save_weights_only=save_weights_only,
            mode=mode, auto_insert_metric_name=auto_insert_metric_name, every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end, enable_version_counter=enable_version_counter,
        )
        self.async_save = async_save
        self._async: Any = None  # an AsyncCheckpointer on global rank 0 when async_save is on
        self._ckptmgr_options = {"durability": durability, "durability_timeout_s": durability_timeout_s,
                                 "config_fingerprint": config_fingerprint}
        self.manager: CheckpointManager | None = None
        self.save_seconds: list[float] = []  # wall time of each save, for stop decisions
        self.history_save_seconds: float | None = None  # the slowest of the run's recent saves, from its journal
        self._rng_to_restore: list[dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key for the same arguments: a run saved by one resumes with the other."""
        key = super().state_key  # type: ignore[misc]
        own = type(self).__qualname__
        return _PARENT_NAME + key[len(own):] if key.startswith(own) else key

    @property
    def _legacy_state_key(self) -> str:
        """The key ckptmgr 0.2 saved this callback's state under (its own class name): a run checkpointed by
        that release resumes with its top-k and `last` bookkeeping (Lightning falls back to this key)."""
        return type(self).__name__ + super().state_key[len(type(self).__qualname__):]  # type: ignore[misc]

    # -- lifecycle --------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _compat.check_namespace(self, trainer)
        super().setup(trainer, pl_module, stage)  # type: ignore[misc]
        self._ensure_ready(trainer)
        if self.dirpath is not None and os.path.isdir(str(self.dirpath)):
            self.history_save_seconds = recent_save_seconds(str(self.dirpath))
        if stage == "fit" and self.manager is not None and os.path.isdir(str(self.dirpath)):
            # One writer per run: an existing run is locked before training, so a second writer is
            # refused before it trains. A new directory is created by the first save, as Lightning does.
            self.manager.open()

    def _ensure_ready(self, trainer: Any) -> None:
        """The manager (global rank 0) and the CheckpointIO plugin; also for saves made without ``setup``."""
        if trainer.is_global_zero and self.manager is None and self.dirpath is not None:
            self.manager = CheckpointManager(self.dirpath, keep_last=None, last_alias=None, **self._ckptmgr_options)
        if not _writes_shards(trainer.strategy):
            from .io import ManagedCheckpointIOMixin

            current = trainer.strategy.checkpoint_io
            if not isinstance(current, ManagedCheckpointIOMixin):
                trainer.strategy.checkpoint_io = _compat.module_for(self).ManagedCheckpointIO(current)
        elif self.async_save and not _is_deepspeed(trainer.strategy):
            log.warning("[ckptmgr] async_save is not available with %s (DCP writes every rank's shard itself); "
                        "saving synchronously", type(trainer.strategy).__name__)
            self.async_save = False
        # Rank 0 persists a single-file save; under DeepSpeed every rank persists its own shards.
        every_rank = _is_deepspeed(trainer.strategy)
        if self.async_save and self._async is None and (self.manager is not None or every_rank):
            from ..async_save import AsyncCheckpointer

            self._async = AsyncCheckpointer(self.manager)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._async is not None:
            self._async.check()  # a background save that failed is raised here, at the next step
        if self._rng_to_restore is not None:
            rng.restore(self._rng_to_restore[trainer.global_rank])
            self._rng_to_restore = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._async is not None:
            self._async.release_writers()  # the snapshot's copy overlapped forward/backward; the step writes

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

    # -- the three places bytes reach the disk -------------------------------
    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        started = time.monotonic()
        self._ensure_ready(trainer)
        if not self._managed_here(filepath):
            super()._save_checkpoint(trainer, filepath)  # type: ignore[misc]
            return
        previous = self._last_checkpoint_saved
        if self._is_copy_of_this_step(trainer, filepath, previous):
            self._alias(trainer, previous, filepath, aliases.COPY)  # save_last=True: the same bytes, no 2nd write
        else:
            self._commit_save(trainer, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        self.save_seconds.append(time.monotonic() - started)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _link_checkpoint(trainer: Any, filepath: str, linkpath: str) -> None:
        """``save_last="link"``: Lightning's static hook; the callback that owns ``linkpath`` swaps the link in
        atomically (Lightning removes the old link first, then makes the new one)."""
        owner = _owner(trainer, linkpath)
        if owner is None or not owner._managed_here(filepath):
            _compat.module_for_trainer(trainer).callbacks.ModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)
            return
        if os.path.abspath(filepath) != os.path.abspath(linkpath):
            owner._alias(trainer, filepath, linkpath, aliases.LINK)
        else:
            trainer.strategy.barrier()

    def _remove_checkpoint(self, trainer: Any, filepath: str) -> None:
        if not self._managed_here(filepath):
            super()._remove_checkpoint(trainer, filepath)  # type: ignore[misc]
            return
        if trainer.is_global_zero and self.manager is not None:
            manager, name = self.manager, os.path.basename(filepath)

            def delete() -> None:  # with async saves: only after the new checkpoint committed
                if os.path.lexists(filepath):
                    manager.delete(name)

            self._in_order(delete)

    # -- helpers -------------------------------------------------------------
    def _managed_here(self, filepath: str) -> bool:
        """A path in this callback's directory (Lightning may be asked to write elsewhere)."""
        return self.dirpath is not None and os.path.dirname(os.path.abspath(filepath)) == os.path.abspath(
            str(self.dirpath))

    def _is_copy_of_this_step(self, trainer: Any, filepath: str, previous: str) -> bool:
        """Lightning's ``save_last=True`` writing ``last.ckpt`` again right after a save at this step."""
        return (self.save_last is True and filepath == self.last_model_path and bool(previous)
                and previous != filepath and self._last_global_step_saved == trainer.global_step
                and self._managed_here(previous))

    def _alias(self, trainer: Any, target: str, alias: str, style: str) -> None:
        if trainer.is_global_zero and self.manager is not None:
            manager = self.manager
            self._in_order(lambda: manager.point_last(os.path.basename(target), alias=os.path.basename(alias),
                                                      style=style))
        trainer.strategy.barrier("ckptmgr.alias")

    def _commit_save(self, trainer: Any, filepath: str) -> None:
        """One save through the commit protocol; a collective (every rank calls it)."""
        sharded = _writes_shards(trainer.strategy)
        handle = staging = None
        layout = _layout(trainer)
        if self._async is not None:
            self._async.wait()  # at most one save in flight; raises the previous one's error (on every rank)
        if trainer.is_global_zero:
            if self.manager is None:
                raise UsageError(filepath, "ManagedCheckpoint has no directory to save into")
            handle = self.manager.begin(
                step=trainer.global_step, epoch=trainer.current_epoch, name=os.path.basename(filepath),
                kind=sharded or "lightning", shape="directory" if sharded else "file",
                world_size=trainer.world_size, layout=layout,
                metadata={"weights_only": bool(self.save_weights_only)},
            )
            staging = handle.path
        try:
            if sharded:
                staging = trainer.strategy.broadcast(staging)
                self._sharded_save(trainer, handle, staging, layout, sharded)
            else:
                io = trainer.strategy.checkpoint_io
                if handle is not None:
                    io.target = (handle, self.manager, self._async)
                trainer.save_checkpoint(filepath, self.save_weights_only)  # the plugin writes into `handle`
                if handle is not None and io.target is not None:
                    io.target = None
                    self.manager.abort(handle)  # type: ignore[union-attr]
                    self._adopt_what_the_strategy_wrote(trainer, filepath)
                elif handle is not None and self._async is None:
                    # Lightning has applied its version counter already: a name that exists is saved over.
                    self.manager.commit(handle, replace=True)  # type: ignore[union-attr]
        except BaseException:
            if not sharded:
                trainer.strategy.checkpoint_io.target = None
            if handle is not None and (self._async is None or not handle.submitted):
                self.manager.abort(handle)  # type: ignore[union-attr]
            raise
        trainer.strategy.barrier("ckptmgr.commit")

    def _adopt_what_the_strategy_wrote(self, trainer: Any, filepath: str) -> None:
        """The strategy did not write through its CheckpointIO plugin: commit what it wrote in place."""
        assert self.manager is not None
        if not os.path.lexists(filepath):
            log.warning("[ckptmgr] Trainer.save_checkpoint wrote nothing at %s: no checkpoint committed", filepath)
            return
        log.warning("[ckptmgr] %s wrote %s itself (not through its CheckpointIO plugin): committed in place, "
                    "without the atomic rename", type(trainer.strategy).__name__, filepath)
        self.manager.adopt(os.path.basename(filepath), step=trainer.global_step, epoch=trainer.current_epoch,
                           kind="lightning", world_size=trainer.world_size, layout=_layout(trainer))

    def _sharded_save(self, trainer: Any, handle: Any, staging: str, layout: dict[str, Any], kind: str) -> None:
        """Every rank writes its shards into the staging directory and hashes them; rank 0 commits.

        DeepSpeed's files are hashed as its engine finishes each one. A DCP save goes through DCP's default
        writer inside the strategy, so each rank hashes its files right after it (from page cache), and rank
        0 checks them against the ``.metadata`` DCP wrote.
        """
        from ..collective import OwnedFiles, gather_and_commit

        storage = self.manager.storage if self.manager is not None else None
        if kind == "deepspeed" and self._async is not None:
            self._deepspeed_async_save(trainer, handle, staging, layout)
            return
        if kind == "deepspeed":
            hasher: Any = _shard_hasher(trainer, staging, self.manager)
            expected, what = None, "DeepSpeed"
        else:
            hasher, expected, what = OwnedFiles(staging, dcp_layout.owner_rank, storage), _dcp_shards(staging), "DCP"
        with hasher if kind == "deepspeed" else nullcontext():
            trainer.save_checkpoint(staging, self.save_weights_only)
        gather_and_commit(self.manager, handle, staging, rank=trainer.global_rank, world_size=trainer.world_size,
                          layout=layout, hasher=hasher, replace=True, expected=expected, what=what)

    def _deepspeed_async_save(self, trainer: Any, handle: Any, staging: str, layout: dict[str, Any]) -> None:
        """Every rank snapshots its shards and returns; its writes and the commit run on ``self._async``."""
        from ..deepspeed_async import AsyncDeepSpeedSaver

        saver = AsyncDeepSpeedSaver(trainer.strategy.deepspeed_engine, self.manager, saver=self._async)
        saver.snapshot_and_submit(lambda: trainer.save_checkpoint(staging, self.save_weights_only), handle, staging,
                                  layout, replace=True)

    def save_now(self, trainer: Any, reason: str) -> str | None:
        """Save at this step (time budget, preemption) unless this step is already saved."""
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved:
            return self._last_checkpoint_saved
        candidates = self._monitor_candidates(trainer)  # type: ignore[attr-defined]
        log.info("[ckptmgr] saving at step %s (%s)", trainer.global_step, reason)
        # Through Lightning's own top-k bookkeeping, so retention stays Lightning's.
        self._save_topk_checkpoint(trainer, candidates)  # type: ignore[attr-defined]
        self._save_last_checkpoint(trainer, candidates)  # type: ignore[attr-defined]
        if self._last_global_step_saved != trainer.global_step:
            # Neither top-k nor `last` kept this step: a checkpoint of its own, to resume from.
            self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))  # type: ignore[attr-defined]
        return self._last_checkpoint_saved

    def predicted_save_seconds(self) -> float | None:
        """The slowest recent save (with async saves: its stall plus its background persist); before this
        process has saved, the slowest of the run's recent saves recorded in its journal."""
        if not self.save_seconds:
            return self.history_save_seconds
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


def recent_save_seconds(run_dir: str, *, last: int = 5) -> float | None:
    """The slowest of the run's last saves, as its journal records them (None without history)."""
    from ..journal import read_events

    seconds = [e["seconds"] for e in read_events(run_dir) if e["event"] == "save" and isinstance(e.get("seconds"),
                                                                                                (int, float))]
    return max(seconds[-last:]) if seconds else None


def _owner(trainer: Any, path: str) -> ManagedCheckpointMixin | None:
    """The ManagedCheckpoint of this Trainer whose directory holds ``path``."""
    callbacks = getattr(trainer, "callbacks", None)
    for callback in callbacks if isinstance(callbacks, list) else []:
        if isinstance(callback, ManagedCheckpointMixin) and callback._managed_here(path):
            return callback
    return None


def _shard_hasher(trainer: Any, staging_path: str, manager: CheckpointManager | None) -> "ShardHasher":
    from ..deepspeed import ShardHasher

    return ShardHasher(trainer.strategy.deepspeed_engine, staging_path, manager.storage if manager else None)


def _is_deepspeed(strategy: Any) -> bool:
    return type(strategy).__name__ == "DeepSpeedStrategy" or hasattr(strategy, "deepspeed_engine")


def _writes_dcp(strategy: Any) -> bool:
    """FSDPStrategy(state_dict_type="sharded") and ModelParallelStrategy (distributed checkpoints, the default):
    every rank writes its shard through DCP, into a directory named like the checkpoint. Read from the
    strategies' own settings (tests/test_lightning_dcp.py builds both, so a rename in Lightning is caught)."""
    return getattr(strategy, "_state_dict_type", None) == "sharded" or \
        getattr(strategy, "_save_distributed_checkpoint", None) is True


def _writes_shards(strategy: Any) -> str | None:
    """The kind of a checkpoint every rank writes part of ("deepspeed", "dcp"), or None (rank 0 writes it)."""
    if _is_deepspeed(strategy):
        return "deepspeed"
    return "dcp" if _writes_dcp(strategy) else None


def _dcp_shards(staging: str) -> Any:
    """Rank 0, once every rank wrote: the files DCP's ``.metadata`` names, each there and long enough."""

    def expected() -> dict[str, list[str]]:
        metadata = dcp_layout.read_metadata(staging)
        problems = dcp_layout.completeness_problems(staging, metadata)
        if problems:
            raise InvalidCheckpointError(staging, "; ".join(problems))
        return dcp_layout.shards_in(staging, metadata)

    return expected


def _layout(trainer: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {"strategy": type(trainer.strategy).__name__}
    if _writes_dcp(trainer.strategy):
        layout["format"] = "dcp"
    config = getattr(trainer.strategy, "config", None)
    if isinstance(config, dict) and "zero_optimization" in config:
        from ..deepspeed import DEFAULT_TAG, expected_shards

        stage = int(config["zero_optimization"].get("stage", 0))
        layout.update(zero_stage=stage, tag=DEFAULT_TAG, dp_world_size=trainer.world_size)
        if stage >= 1:
            bf16 = bool((config.get("bf16") or {}).get("enabled", False))
            layout["shards"] = expected_shards(DEFAULT_TAG, trainer.world_size, stage, bf16=bf16)
    return layout
