"""Lightning integration for ``pytorch_lightning`` (the ``pytorch-lightning`` package).

The same classes as :mod:`ckptmgr.lightning`, built on ``pytorch_lightning``'s
base classes so that its Trainer takes them:

    import pytorch_lightning as pl
    from ckptmgr.pytorch_lightning import ManagedCheckpoint, Preemption, TimeBudget, resume_checkpoint
"""

from __future__ import annotations

from .durations import parse_duration
from .lightning import _compat
from .lightning.checkpoint import ManagedCheckpointMixin
from .lightning.io import ManagedCheckpointIOMixin
from .lightning.resume import resume_checkpoint
from .lightning.stopping import PreemptionMixin, TimeBudgetMixin

_pl = _compat.require("pytorch_lightning")


class ManagedCheckpoint(ManagedCheckpointMixin, _pl.callbacks.ModelCheckpoint):
    __doc__ = ManagedCheckpointMixin.__doc__


class ManagedCheckpointIO(ManagedCheckpointIOMixin, _compat.fabric_checkpoint_io("pytorch_lightning")):
    __doc__ = ManagedCheckpointIOMixin.__doc__


class TimeBudget(TimeBudgetMixin, _pl.Callback):
    __doc__ = TimeBudgetMixin.__doc__


class Preemption(PreemptionMixin, _pl.Callback):
    __doc__ = PreemptionMixin.__doc__


__all__ = ["ManagedCheckpoint", "ManagedCheckpointIO", "Preemption", "TimeBudget", "parse_duration",
           "resume_checkpoint"]
