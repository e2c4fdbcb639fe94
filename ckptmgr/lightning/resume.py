"""The resume decision: which verified checkpoint to hand to ``trainer.fit(ckpt_path=...)``."""

from __future__ import annotations

import contextlib
import logging
import os

from ..catalog import Checkpoint
from ..errors import NotACheckpointError, NoValidCheckpointError
from ..manager import CheckpointManager

log = logging.getLogger(__name__)


def resume_checkpoint(run_dir: str, *, allow_fresh: bool = False, config_fingerprint: str | None = None,
                      force_config: bool = False, quarantine: bool | None = None) -> Checkpoint | None:
    """The newest verified checkpoint of ``run_dir``, or None for a fresh start.

    Logs ``[ckptmgr] resuming from <path> (step S, epoch E)`` and one line per
    candidate skipped, with its reason. If checkpoints exist but none verifies,
    raises :class:`NoValidCheckpointError` rather than silently starting over;
    ``allow_fresh`` permits the fresh start (and says so). A checkpoint written
    under another config fingerprint is refused unless ``force_config``.

    ``quarantine`` (default: on the global rank 0 process) moves corrupt
    candidates newer than the pick aside, taking the writer lock briefly.
    """
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise NotACheckpointError(run_dir, "not a run directory (it exists and is not a directory)")
    if not os.path.isdir(run_dir):
        log.info("[ckptmgr] %s does not exist yet: starting fresh", run_dir)
        return None
    if quarantine is None:
        quarantine = global_rank() == 0
    manager = CheckpointManager(run_dir, config_fingerprint=config_fingerprint)
    try:
        with manager if quarantine else contextlib.nullcontext():
            found = manager.resolve(strict=True, quarantine=quarantine)
    except NoValidCheckpointError:
        if not allow_fresh:
            raise
        log.warning("[ckptmgr] no valid checkpoint in %s: starting fresh as allowed", run_dir)
        return None
    if found is None:
        log.info("[ckptmgr] no checkpoint in %s: starting fresh", run_dir)
        return None
    manager.check_config(found, force=force_config)
    log.warning("[ckptmgr] resuming from %s (step %s, epoch %s)", found.path, found.step, found.epoch)
    return found


def global_rank() -> int:
    """The process's global rank before any Trainer exists (launchers set RANK or LOCAL_RANK)."""
    for variable in ("RANK", "GLOBAL_RANK", "LOCAL_RANK"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 0
