"""Names in a run directory: what they mean and how they are built.

Checkpoint names follow Lightning's ``ModelCheckpoint`` so that users find
what they expect; everything ckptmgr writes for itself starts with a dot so
that Lightning, DeepSpeed and ``ls`` leave it alone.

=====================================  =========================================
name                                   meaning
=====================================  =========================================
``epoch=3-step=1200.ckpt``             a checkpoint (``step`` and ``epoch`` parsed)
``step=1200.ckpt``, ``epoch=3.ckpt``   a checkpoint under another template
``last.ckpt``, ``last-v1.ckpt``        the ``last`` alias (a hint, never trusted)
``.ckptmgr-staging.<name>.<id>``       a save in progress or abandoned by a crash
``.ckptmgr-trash.<name>.<id>``         a checkpoint being deleted
``.ckptmgr/``                          lock, run journal, quarantine
=====================================  =========================================
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

STAGING_PREFIX = ".ckptmgr-staging."
TRASH_PREFIX = ".ckptmgr-trash."
SEAL_ASIDE_PREFIX = ".ckptmgr-sealed-original."
STATE_DIR = ".ckptmgr"
QUARANTINE_DIR = f"{STATE_DIR}/quarantine"
LAST_NAME = "last.ckpt"
DEFAULT_TEMPLATE = "epoch={epoch}-step={step}"
CHECKPOINT_SUFFIX = ".ckpt"

_STEP = re.compile(r"(?:^|[-_/])step=(\d+)")
_EPOCH = re.compile(r"(?:^|[-_/])epoch=(\d+)")
_LAST = re.compile(r"^last(?:-v\d+)?(?:\.ckpt)?$")


@dataclass(frozen=True)
class ParsedName:
    step: int | None
    epoch: int | None
    is_last: bool


def parse_name(name: str) -> ParsedName:
    """Read step and epoch out of a checkpoint name, whatever the template.

    >>> parse_name("epoch=3-step=1200.ckpt")
    ParsedName(step=1200, epoch=3, is_last=False)
    >>> parse_name("last.ckpt")
    ParsedName(step=None, epoch=None, is_last=True)
    """
    step = _STEP.search(name)
    epoch = _EPOCH.search(name)
    return ParsedName(
        step=int(step.group(1)) if step else None,
        epoch=int(epoch.group(1)) if epoch else None,
        is_last=bool(_LAST.match(name)),
    )


def checkpoint_name(step: int, epoch: int | None, template: str = DEFAULT_TEMPLATE) -> str:
    """Build a checkpoint name the way Lightning does with ``auto_insert_metric_name``.

    >>> checkpoint_name(1200, 3)
    'epoch=3-step=1200.ckpt'
    >>> checkpoint_name(1200, None)
    'step=1200.ckpt'
    """
    if epoch is None and template == DEFAULT_TEMPLATE:
        template = "step={step}"
    return template.format(step=step, epoch=epoch) + CHECKPOINT_SUFFIX


def versioned(name: str, version: int) -> str:
    """``epoch=0-step=5.ckpt`` -> ``epoch=0-step=5-v1.ckpt`` (Lightning's version counter)."""
    stem = name[: -len(CHECKPOINT_SUFFIX)] if name.endswith(CHECKPOINT_SUFFIX) else name
    suffix = CHECKPOINT_SUFFIX if name.endswith(CHECKPOINT_SUFFIX) else ""
    return f"{stem}-v{version}{suffix}"


def staging_name(target: str, token: str | None = None) -> str:
    return f"{STAGING_PREFIX}{target}.{token or os.urandom(4).hex()}"


def trash_name(target: str) -> str:
    return f"{TRASH_PREFIX}{target}.{os.urandom(4).hex()}"


def is_internal(name: str) -> bool:
    """Names ckptmgr owns; never candidates."""
    return name.startswith(".")


def is_staging(name: str) -> bool:
    return name.startswith(STAGING_PREFIX)


def is_trash(name: str) -> bool:
    return name.startswith(TRASH_PREFIX)


def looks_like_checkpoint(name: str) -> bool:
    """True for names a trainer would have given a checkpoint."""
    if is_internal(name):
        return False
    parsed = parse_name(name)
    if parsed.is_last or parsed.step is not None or parsed.epoch is not None:
        return True
    return name.endswith((".ckpt", ".pt", ".pth", ".bin"))
