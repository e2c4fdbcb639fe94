"""Two Lightning namespaces, one class per namespace.

``lightning.pytorch`` (package ``lightning``) and ``pytorch_lightning``
(package ``pytorch-lightning``) ship the same code as two distinct class
hierarchies: a Trainer of one only takes callbacks and plugins built on its
own base classes. ckptmgr therefore builds its classes twice, from the same
behaviour mixins: ``ckptmgr.lightning`` on ``lightning.pytorch`` and
``ckptmgr.pytorch_lightning`` on ``pytorch_lightning``. A callback handed to
the other namespace's Trainer is refused with a message naming the right
import, rather than half-working.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

CKPTMGR_MODULES = {"lightning.pytorch": "ckptmgr.lightning", "pytorch_lightning": "ckptmgr.pytorch_lightning"}


def namespace_of_trainer(trainer: object) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``, from the Trainer's own module."""
    module = type(trainer).__module__
    return "pytorch_lightning" if module.startswith("pytorch_lightning") else "lightning.pytorch"


def namespace_of(obj: object) -> str:
    """The namespace a ckptmgr callback was built for (from the Lightning class it derives from)."""
    for base in type(obj).__mro__:
        if base.__module__.startswith("pytorch_lightning."):
            return "pytorch_lightning"
        if base.__module__.startswith("lightning.pytorch."):
            return "lightning.pytorch"
    return "lightning.pytorch"


def module_for(obj: object) -> ModuleType:
    """``ckptmgr.lightning`` or ``ckptmgr.pytorch_lightning``: the module whose classes match ``obj``."""
    return importlib.import_module(CKPTMGR_MODULES[namespace_of(obj)])


def module_for_trainer(trainer: object) -> ModuleType:
    """The Lightning namespace module (``lightning.pytorch`` or ``pytorch_lightning``) of a Trainer."""
    return importlib.import_module(namespace_of_trainer(trainer))


def check_namespace(callback: object, trainer: object) -> None:
    ours, theirs = namespace_of(callback), namespace_of_trainer(trainer)
    if ours != theirs:
        raise TypeError(f"{type(callback).__name__} from {CKPTMGR_MODULES[ours]} is built for {ours}, but this "
                        f"Trainer is {theirs}'s: import it from {CKPTMGR_MODULES[theirs]} instead")


def require(namespace: str) -> Any:
    try:
        return importlib.import_module(namespace)
    except ImportError as exc:
        package = "lightning" if namespace == "lightning.pytorch" else "pytorch-lightning"
        other = "ckptmgr.pytorch_lightning" if namespace == "lightning.pytorch" else "ckptmgr.lightning"
        raise ImportError(f"{CKPTMGR_MODULES[namespace]} needs `{package}` ({exc}); pip install 'ckptmgr[lightning]'"
                          f", or use {other} if you train with the other namespace") from exc


def fabric_checkpoint_io(namespace: str) -> type:
    """The CheckpointIO base class of a namespace's fabric package."""
    name = "lightning.fabric.plugins" if namespace == "lightning.pytorch" else "lightning_fabric.plugins"
    return importlib.import_module(name).CheckpointIO

