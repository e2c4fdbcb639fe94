"""Test helpers that make and damage files: shared by the test modules (which never import each other)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile

import torch

from ckptmgr.hashing import digest_bytes
from tests.conftest import tensor_state


def flip(path: str, where: str) -> None:
    size = os.path.getsize(path)
    offset = {"start": 0, "middle": size // 2, "end": size - 1}[where]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def snapshot(root: str) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = None
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    digest = hashlib.md5(f.read()).hexdigest()
            state[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


def resigned(body: dict) -> bytes:
    """Re-compute the self-hash so only the field under test is wrong."""
    body = dict(body)
    body.pop("manifest_xxh3_128", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    body["manifest_xxh3_128"] = digest_bytes(canonical)
    return json.dumps(body).encode()


def torch_file(path: str, step: int = 1) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": tensor_state(step), "global_step": step}, path)
    return path


def flip_inside_record(path: str) -> None:
    """Flip a byte inside a tensor record's data (not in zip headers)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 100)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # the local header's own name and extra lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + 10)
        b = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([b ^ 1]))


def deepspeed_dir(path: str) -> str:
    os.makedirs(os.path.join(path, "checkpoint"))
    with open(os.path.join(path, "latest"), "w") as f:
        f.write("checkpoint")
    torch.save({"module": tensor_state(1)}, os.path.join(path, "checkpoint", "mp_rank_00_model_states.pt"))
    torch.save({"optimizer": tensor_state(2)}, os.path.join(path, "checkpoint",
                                                            "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    return path
