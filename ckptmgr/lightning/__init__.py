"""Lightning integration: managed checkpoints, time budget, preemption, exact resume.

Works with ``import lightning.pytorch as pl`` and ``import pytorch_lightning as pl``
alike: every callback here is accepted by either Trainer.

    from ckptmgr.lightning import ManagedCheckpoint, Preemption, TimeBudget, resume_checkpoint

    checkpoint = ManagedCheckpoint(dirpath=run_dir, every_n_train_steps=500, save_last=True)
    trainer = pl.Trainer(callbacks=[checkpoint, TimeBudget("23.5h"), Preemption(grace_s=30)])
    found = resume_checkpoint(run_dir)
    trainer.fit(model, ckpt_path=found.load_path if found else None)
"""

from .checkpoint import ManagedCheckpoint
from .io import ManagedCheckpointIO
from .resume import resume_checkpoint
from .stopping import Preemption, TimeBudget, parse_duration

__all__ = ["ManagedCheckpoint", "ManagedCheckpointIO", "Preemption", "TimeBudget", "parse_duration",
           "resume_checkpoint"]
