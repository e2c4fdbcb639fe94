"""Adopt a legacy checkpoint into the managed format (``ckptmgr seal``).

A legacy checkpoint is checked first (torch zip CRC32s); a corrupt one is
refused. Then:

- a directory (DeepSpeed layout) is sealed in place, in commit-marker mode:
  its files are hashed and fsynced, and the manifest is written last
  (temporary name, fsync, rename), so the directory becomes a managed
  checkpoint without moving a byte;
- a single file ``X`` becomes a managed directory ``X/`` holding the payload
  as ``checkpoint.pt``: the file is hard-linked (copied where links are not
  supported) into a staging directory, the original is moved aside under
  ``.ckptmgr-sealed-original.X.*``, the staging directory is published as
  ``X``, and only then is the aside name removed. A crash in between leaves
  the original under the aside name, which nothing ever deletes.
"""

from __future__ import annotations

import os

from .catalog import Checkpoint
from .commit import ManifestFields, StagedCheckpoint, abandon
from .errors import InvalidCheckpointError, PathNotFoundError, UsageError, from_os_error
from .manager import PAYLOAD_NAME, CheckpointManager
from .manifest import MANIFEST_NAME
from .naming import SEAL_ASIDE_PREFIX, parse_name, staging_name
from .verify import Status, has_manifest, verify_legacy


def seal(path: str, *, step: int | None = None, epoch: int | None = None,
         allow_unchecked: bool = False, manager: CheckpointManager | None = None) -> Checkpoint:
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        raise PathNotFoundError(path, "no such file or directory")
    if os.path.isdir(path) and has_manifest(path):
        raise UsageError(path, "already a managed checkpoint; nothing to seal")
    result = verify_legacy(path)
    if result.status is Status.LEGACY_CORRUPT:
        raise InvalidCheckpointError(path, f"refusing to seal a corrupt checkpoint: {result.reason}")
    if result.status is Status.INCOMPLETE:
        raise InvalidCheckpointError(path, f"refusing to seal: {result.reason}")
    if result.status is Status.LEGACY_UNCHECKED and not allow_unchecked:
        raise InvalidCheckpointError(path, "no zip records to check (old pickle format)",
                                     hint="pass --allow-unchecked to seal it anyway")
    step, epoch = _step_and_epoch(path, step, epoch)
    manager = manager or CheckpointManager(os.path.dirname(path), keep_last=None, last_alias=None)
    manager.open()
    if os.path.isdir(path):
        return _seal_directory(manager, path, step, epoch)
    return _seal_file(manager, path, step, epoch)


def _step_and_epoch(path: str, step: int | None, epoch: int | None) -> tuple[int, int | None]:
    parsed = parse_name(os.path.basename(path))
    step = step if step is not None else parsed.step
    epoch = epoch if epoch is not None else parsed.epoch
    if step is None:
        raise UsageError(path, "the name carries no step=N", hint="pass --step (and --epoch)")
    return step, epoch


def _seal_directory(manager: CheckpointManager, path: str, step: int, epoch: int | None) -> Checkpoint:
    is_deepspeed = os.path.exists(os.path.join(path, "latest")) or os.path.isdir(os.path.join(path, "checkpoint"))
    fields = ManifestFields(step=step, epoch=epoch, kind="deepspeed" if is_deepspeed else "files", load_path=".",
                            metadata={"sealed_from": "legacy-directory"})
    staged = StagedCheckpoint(manager.storage, os.path.dirname(path), os.path.basename(path), fields,
                              workers=manager.workers)
    sequence = manager._next_sequence()
    entries = staged._hash_remaining()
    manifest = staged._build_manifest(os.path.basename(path), sequence, entries, 0.0)
    tmp = os.path.join(path, f".{MANIFEST_NAME}.{os.urandom(4).hex()}.tmp")
    try:
        with manager.storage.open_write(tmp) as f:
            f.write(manifest.to_json_bytes())
            manager.storage.fsync(f)
        staged._sync_dirs()
        manager.storage.rename_noreplace(tmp, os.path.join(path, MANIFEST_NAME))
        manager.storage.sync_dir(path)
    except OSError as exc:
        abandon(manager.storage, tmp)
        raise from_os_error(path, "sealing the directory", exc) from exc
    manager._sequence = sequence
    manager._make_durable(path)
    return Checkpoint(path, manifest)


def _seal_file(manager: CheckpointManager, path: str, step: int, epoch: int | None) -> Checkpoint:
    run_dir, name = os.path.split(path)
    fields = ManifestFields(step=step, epoch=epoch, kind="torch", load_path=PAYLOAD_NAME,
                            metadata={"sealed_from": "legacy-file"})
    staged = StagedCheckpoint(manager.storage, run_dir, staging_name(name), fields, workers=manager.workers)
    staged.create()
    payload = os.path.join(staged.path, PAYLOAD_NAME)
    aside = os.path.join(run_dir, f"{SEAL_ASIDE_PREFIX}{name}.{os.urandom(4).hex()}")
    try:
        try:
            manager.storage.link(path, payload)
        except OSError:
            manager.storage.copy_file(path, payload)  # no hard links here: a full copy
        manager.storage.rename_noreplace(path, aside)
        manager.storage.sync_dir(run_dir)
    except OSError as exc:
        abandon(manager.storage, staged.path)
        raise from_os_error(path, "staging the file to seal", exc) from exc
    sequence = manager._next_sequence()
    target, manifest = staged.finalize(name=name, sequence=sequence)
    manager._sequence = sequence
    manager._make_durable(target)
    manager.storage.unlink(aside)
    manager.storage.sync_dir(run_dir)
    return Checkpoint(target, manifest)
