"""Lightning integration for ``lightning.pytorch``: managed checkpoints, time budget, preemption, exact resume.

    import lightning.pytorch as pl
    from ckptmgr.lightning import ManagedCheckpoint, Preemption, TimeBudget, resume_checkpoint

    checkpoint = ManagedCheckpoint(dirpath=run_dir, every_n_train_steps=500, save_last=True)
    trainer = pl.Trainer(callbacks=[checkpoint, TimeBudget("23.5h"), Preemption(grace_s=30)])
    found = resume_checkpoint(run_dir)
    trainer.fit(model, ckpt_path=found.load_path if found else None)

With ``import pytorch_lightning as pl``, import the same names from ``ckptmgr.pytorch_lightning``.
"""

from __future__ import annotations

from ..durations import parse_duration
from . import _compat
from .checkpoint import ManagedCheckpointMixin
from .io import ManagedCheckpointIOMixin
from .resume import resume_checkpoint
from .stopping import PreemptionMixin, TimeBudgetMixin

_pl = _compat.require("lightning.pytorch")


class ManagedCheckpoint(ManagedCheckpointMixin, _pl.callbacks.ModelCheckpoint):
    __doc__ = ManagedCheckpointMixin.__doc__


class ManagedCheckpointIO(ManagedCheckpointIOMixin, _compat.fabric_checkpoint_io("lightning.pytorch")):
    __doc__ = ManagedCheckpointIOMixin.__doc__


class TimeBudget(TimeBudgetMixin, _pl.Callback):
    __doc__ = TimeBudgetMixin.__doc__


class Preemption(PreemptionMixin, _pl.Callback):
    __doc__ = PreemptionMixin.__doc__


__all__ = ["ManagedCheckpoint", "ManagedCheckpointIO", "Preemption", "TimeBudget", "parse_duration",
           "resume_checkpoint"]
