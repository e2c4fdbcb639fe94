"""Run directories as ckptmgr 0.2 (format 2) wrote them: the manifest inside each checkpoint directory.

Built from the format's definition (docs/FORMAT.md, version 2), so that tests of
reading, resuming and retention over old runs do not need the old writer.
"""

from __future__ import annotations

import os
import time

import torch

from ckptmgr.hashing import CHUNKED, PLAIN, hash_files
from ckptmgr.manifest import MANIFEST_NAME, FileEntry, Manifest


def tensor_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"weight": torch.randn(64, 64, generator=g), "bias": torch.full((64,), float(step))}


def write_format2_checkpoint(run_dir: str, step: int, *, sequence: int, state=None, version: int = 2) -> str:
    """A checkpoint directory of format 2 (or 1: one plain xxh3_128 per file) holding ``checkpoint.pt``."""
    name = f"epoch=0-step={step}.ckpt"
    path = os.path.join(run_dir, name)
    os.makedirs(path)
    payload = os.path.join(path, "checkpoint.pt")
    torch.save(tensor_state(step) if state is None else state, payload)
    size = os.path.getsize(payload)
    (digest,) = hash_files([(payload, size)], algorithm=PLAIN if version == 1 else CHUNKED)
    manifest = Manifest(name=name, step=step, epoch=0, sequence=sequence, kind="torch", load_path="checkpoint.pt",
                        files=(FileEntry(path="checkpoint.pt", size=size, xxh3_128=digest),), created_unix=time.time(),
                        format_version=version)
    with open(os.path.join(path, MANIFEST_NAME), "wb") as f:
        f.write(manifest.to_json_bytes())
    return path


def write_format2_run(run_dir: str, steps=(10, 20, 30)) -> list[str]:
    os.makedirs(run_dir, exist_ok=True)
    paths = [write_format2_checkpoint(run_dir, step, sequence=i + 1) for i, step in enumerate(steps)]
    os.symlink(os.path.basename(paths[-1]), os.path.join(run_dir, "last.ckpt"))
    return paths


def convert_to_format2(run_dir: str) -> list[str]:
    """Turn each Lightning `.ckpt` file of ``run_dir`` into a format-2 checkpoint directory (as ckptmgr 0.2
    would have written it: ``NAME/checkpoint.pt`` plus its manifest inside); `last.ckpt` becomes a symlink."""
    names = sorted(n for n in os.listdir(run_dir) if n.endswith(".ckpt") and n != "last.ckpt"
                   and os.path.isfile(os.path.join(run_dir, n)))
    for sequence, name in enumerate(sorted(names, key=lambda n: torch.load(os.path.join(run_dir, n),
                                                                          weights_only=False)["global_step"]), 1):
        path = os.path.join(run_dir, name)
        state = torch.load(path, weights_only=False)
        # ckptmgr 0.2 saved the callback's state under its own class name
        state["callbacks"] = {key.replace("TimedModelCheckpoint{", "ManagedCheckpoint{"): value
                              for key, value in state.get("callbacks", {}).items()}
        os.unlink(path)
        os.makedirs(path)
        payload = os.path.join(path, "checkpoint.pt")
        torch.save(state, payload)
        size = os.path.getsize(payload)
        (digest,) = hash_files([(payload, size)])
        manifest = Manifest(name=name, step=state["global_step"], epoch=state["epoch"], sequence=sequence,
                            kind="lightning", load_path="checkpoint.pt",
                            files=(FileEntry(path="checkpoint.pt", size=size, xxh3_128=digest),),
                            created_unix=time.time(), format_version=2)
        with open(os.path.join(path, MANIFEST_NAME), "wb") as f:
            f.write(manifest.to_json_bytes())
    last = os.path.join(run_dir, "last.ckpt")
    if os.path.lexists(last):
        os.unlink(last)
        os.symlink(names[-1], last)
    return names
