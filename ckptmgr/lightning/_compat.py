"""Both Lightning namespaces, without the user caring which one they import.

``lightning.pytorch`` (package ``lightning``) and ``pytorch_lightning``
(package ``pytorch-lightning``) ship the same code as two distinct class
hierarchies: a callback subclassing one is rejected by the other's Trainer.
Our callbacks therefore subclass the base of every installed namespace, so the
Trainer's ``isinstance`` checks pass for either. Where a base class carries
logic (``ModelCheckpoint``), the object specialises itself to the namespace of
the Trainer it is attached to, at ``setup`` (:func:`specialise`), so only one
namespace's code ever runs against that Trainer.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def installed() -> list[ModuleType]:
    modules = []
    for name in NAMESPACES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    if not modules:
        raise ImportError("ckptmgr.lightning needs `lightning` or `pytorch-lightning`: "
                          "pip install 'ckptmgr[lightning]'")
    return modules


def bases(attribute: str) -> tuple[type, ...]:
    """``bases("callbacks.ModelCheckpoint")`` -> that class from every installed namespace."""
    found = []
    for module in installed():
        obj: Any = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
        found.append(obj)
    return tuple(found)


def namespace_of(trainer: object) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``, from the Trainer's own module."""
    module = type(trainer).__module__
    return "pytorch_lightning" if module.startswith("pytorch_lightning") else "lightning.pytorch"


def fabric_checkpoint_io_bases() -> tuple[type, ...]:
    found = []
    for name in ("lightning.fabric.plugins", "lightning_fabric.plugins"):
        try:
            found.append(importlib.import_module(name).CheckpointIO)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


_SPECIALISED: dict[tuple[type, str], type] = {}


def specialise(obj: Any, trainer: object, mixin: type, attribute: str) -> None:
    """Re-class ``obj`` as ``mixin`` + the Trainer's own namespace's ``attribute`` class."""
    namespace = namespace_of(trainer)
    key = (mixin, namespace)
    if key not in _SPECIALISED:
        base: Any = importlib.import_module(namespace)
        for part in attribute.split("."):
            base = getattr(base, part)
        _SPECIALISED[key] = type(type(obj).__name__, (mixin, base), {"__module__": type(obj).__module__})
    if type(obj) is not _SPECIALISED[key]:
        obj.__class__ = _SPECIALISED[key]
