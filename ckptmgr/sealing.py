"""Adopt a legacy checkpoint into the managed format (``ckptmgr seal``).

A legacy checkpoint (a ``torch.save``/Lightning file, a DeepSpeed directory
or a DCP directory, written without ckptmgr) is checked first: torch's zip
CRC32s; for DeepSpeed that the tag ``latest`` names and its model states are
there; for DCP that every file ``.metadata`` names is there and long enough.
A corrupt or unloadable one is refused.

Sealing then runs the commit protocol in commit-marker mode
(``StagedCheckpoint.finalize_in_place``): the payload stays where it is,
byte for byte and under its name; its files are fsynced and hashed, and the
commit record is published last. A crash before that leaves the checkpoint
exactly as it was (legacy); after it, sealed.
"""

from __future__ import annotations

import os

from .catalog import Checkpoint
from .dcp_layout import read_metadata, shards_in
from .errors import InvalidCheckpointError, NotACheckpointError, PathNotFoundError, UsageError
from .manager import CheckpointManager
from .naming import STATE_DIR, looks_like_checkpoint, parse_name
from .records import read_records
from .verify import Status, has_manifest, records_for, sharded_layout, verify_legacy


def seal(path: str, *, step: int | None = None, epoch: int | None = None,
         allow_unchecked: bool = False, manager: CheckpointManager | None = None) -> Checkpoint:
    path = os.path.abspath(path)
    _refuse_what_is_not_a_legacy_checkpoint(path)
    result = verify_legacy(path)
    if result.status is Status.LEGACY_CORRUPT:
        raise InvalidCheckpointError(path, f"refusing to seal a corrupt checkpoint: {result.reason}")
    if result.status is Status.INCOMPLETE:
        raise InvalidCheckpointError(path, f"refusing to seal: {result.reason}")
    if result.status is Status.LEGACY_UNCHECKED and not allow_unchecked:
        raise InvalidCheckpointError(path, "no zip CRC32s to check (old pickle format, or written without them)",
                                     hint="pass --allow-unchecked to seal it anyway")
    step, epoch = _step_and_epoch(path, step, epoch)
    manager = manager or CheckpointManager(os.path.dirname(path), keep_last=None, last_alias=None)
    kind = (sharded_layout(path) or "files") if os.path.isdir(path) else "torch"
    origin = "legacy-directory" if os.path.isdir(path) else "legacy-file"
    layout: dict = {}
    if kind == "dcp":  # each rank's files, as a managed DCP save records them
        layout = {"format": "dcp", "shards": shards_in(path, read_metadata(path))}
    return manager.adopt(os.path.basename(path), step=step, epoch=epoch, kind=kind, layout=layout,
                         world_size=len(layout.get("shards", {})) or 1, metadata={"sealed_from": origin})


def _refuse_what_is_not_a_legacy_checkpoint(path: str) -> None:
    if not os.path.lexists(path):
        raise PathNotFoundError(path, "no such file or directory")
    if os.path.islink(path):
        raise UsageError(path, "a symlink (an alias such as last.ckpt)", hint="seal the checkpoint it points to")
    run_dir, name = os.path.split(path)
    if records_for(name, read_records(run_dir)) or (os.path.isdir(path) and has_manifest(path)):
        raise UsageError(path, "already a managed checkpoint; nothing to seal")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, STATE_DIR)):
            raise UsageError(path, "this is a run directory", hint="pass one checkpoint in it")
        entries = os.listdir(path)
        if not entries:
            raise NotACheckpointError(path, "an empty directory is not a checkpoint")
        if sharded_layout(path) is None and any(looks_like_checkpoint(e) for e in entries):
            raise UsageError(path, "this is a run directory", hint="pass one checkpoint in it")


def _step_and_epoch(path: str, step: int | None, epoch: int | None) -> tuple[int, int | None]:
    parsed = parse_name(os.path.basename(path))
    step = step if step is not None else parsed.step
    epoch = epoch if epoch is not None else parsed.epoch
    if step is None:
        raise UsageError(path, "the name carries no step=N", hint="pass --step (and --epoch)")
    return step, epoch
