"""Names in a run directory: what they mean and how they are built.

Checkpoint names follow Lightning's ``ModelCheckpoint`` so that users find
what they expect; everything ckptmgr writes for itself lives under the hidden
``.ckptmgr/`` directory, so that Lightning, DeepSpeed and ``ls`` see only
checkpoints (see docs/FORMAT.md, "A run directory").

=========================================  ======================================
name                                       meaning
=========================================  ======================================
``epoch=3-step=1200.ckpt``                 a checkpoint (``step`` and ``epoch`` parsed)
``step=1200.ckpt``, ``epoch=3.ckpt``       a checkpoint under another template
``last.ckpt``, ``last-v1.ckpt``            the ``last`` alias
``.ckptmgr/manifests/<stem>.<token>.json`` a commit record: one checkpoint's manifest
``.ckptmgr/staging/<stem>.<token>``        a save in progress, or abandoned by a crash
``.ckptmgr/aside/<stem>.<token>``          a directory being replaced (rolled back if the new one never lands)
``.ckptmgr/trash/<stem>.<token>``          a checkpoint being deleted
``.ckptmgr/quarantine/<stem>.<unix>.<token>``  a corrupt checkpoint moved aside, with its records
``.ckptmgr-staging.*``, ``.ckptmgr-trash.*``   format-2 leftovers (still cleaned up)
=========================================  ======================================

A *stem* is the checkpoint's name, or, for a name too long to carry a suffix
within the 255-byte limit of a file name, a shortened name plus a hash of the
whole name: ``<stem>.<token>`` always fits.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import xxhash

STATE_DIR = ".ckptmgr"
MANIFESTS_DIR = f"{STATE_DIR}/manifests"
STAGING_DIR = f"{STATE_DIR}/staging"
ASIDE_DIR = f"{STATE_DIR}/aside"
TRASH_DIR = f"{STATE_DIR}/trash"
QUARANTINE_DIR = f"{STATE_DIR}/quarantine"
RECORD_SUFFIX = ".json"
# Format 1 and 2 kept these beside the checkpoints; a writer still cleans them up.
LEGACY_STAGING_PREFIX = ".ckptmgr-staging."
LEGACY_TRASH_PREFIX = ".ckptmgr-trash."
SEAL_ASIDE_PREFIX = ".ckptmgr-sealed-original."
LAST_NAME = "last.ckpt"
DEFAULT_TEMPLATE = "epoch={epoch}-step={step}"
CHECKPOINT_SUFFIX = ".ckpt"
NAME_MAX = 255  # bytes in one file name (Linux, and the FUSE layers a Volume uses)
_TOKEN_BYTES = 4  # token: 8 hex characters
_STEM_MAX = NAME_MAX - 1 - 2 * _TOKEN_BYTES - len(RECORD_SUFFIX) - 8  # room for ".<token>.json" and a tmp suffix

_STEP = re.compile(r"(?:^|[-_/])step=(\d+)")
_EPOCH = re.compile(r"(?:^|[-_/])epoch=(\d+)")
_LAST = re.compile(r"^last(?:-v\d+)?(?:\.ckpt)?$")
_TOKEN = re.compile(r"[0-9a-f]{8}")


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


def check_checkpoint_name(name: str) -> str | None:
    """Why ``name`` cannot name a checkpoint in a run directory, or None if it can."""
    if not isinstance(name, str) or not name:
        return "a checkpoint name must be a non-empty string"
    if "/" in name or "\x00" in name or name in (".", ".."):
        return f"a checkpoint name is one path component (no '/'), got {name!r}"
    if name.startswith("."):
        return f"names starting with '.' are reserved for ckptmgr's own files, got {name!r}"
    if len(os.fsencode(name)) > NAME_MAX:
        return f"a file name is at most {NAME_MAX} bytes; {name[:40]!r}... is {len(os.fsencode(name))}"
    return None


def new_token() -> str:
    return os.urandom(_TOKEN_BYTES).hex()


def stem(name: str) -> str:
    """The part of an internal file name that stands for checkpoint ``name`` (always short enough)."""
    if len(os.fsencode(name)) <= _STEM_MAX:
        return name
    short = os.fsencode(name)[: _STEM_MAX - 18].decode("utf-8", "ignore")
    return f"{short}~{xxhash.xxh3_64_hexdigest(name.encode('utf-8', 'surrogateescape'))}"


def internal_name(name: str, token: str) -> str:
    """``<stem>.<token>``: the name of a staging, aside or trash entry for checkpoint ``name``."""
    return f"{stem(name)}.{token}"


def record_name(name: str, token: str) -> str:
    """The file name of the manifest of checkpoint ``name`` committed under ``token``."""
    return f"{internal_name(name, token)}{RECORD_SUFFIX}"


def split_internal(filename: str) -> tuple[str, str] | None:
    """``"<stem>.<token>"`` (an optional ``.json`` removed) -> ``(stem, token)``; None if not of that form."""
    if filename.endswith(RECORD_SUFFIX):
        filename = filename[: -len(RECORD_SUFFIX)]
    head, dot, token = filename.rpartition(".")
    if not dot or not head or not _TOKEN.fullmatch(token):
        return None
    return head, token


def is_internal(name: str) -> bool:
    """Names ckptmgr owns (and hidden files); never candidates."""
    return name.startswith(".")


def is_legacy_leftover(name: str) -> bool:
    """A format-2 staging or trash entry beside the checkpoints."""
    return name.startswith((LEGACY_STAGING_PREFIX, LEGACY_TRASH_PREFIX))


def looks_like_checkpoint(name: str) -> bool:
    """True for names a trainer would have given a checkpoint."""
    if is_internal(name):
        return False
    parsed = parse_name(name)
    if parsed.is_last or parsed.step is not None or parsed.epoch is not None:
        return True
    return name.endswith((".ckpt", ".pt", ".pth", ".bin"))
