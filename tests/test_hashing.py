"""Format 2's chunked digest, the parallel payload writer, and reading format-1 checkpoints.

The reference digest is computed here straight from the definition in
docs/FORMAT.md with xxhash, independently of ckptmgr.hashing.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random

import pytest
import torch
import xxhash

from ckptmgr import CheckpointManager, CommitError
from ckptmgr.hashing import CHUNK_BYTES, PLAIN, ChunkedHasher, FileChanged, hash_files
from ckptmgr.manager import _torch_crc32
from ckptmgr.manifest import MANIFEST_NAME
from ckptmgr.naming import STAGING_DIR
from ckptmgr.records import read_records
from ckptmgr.testing import Fault, FaultyStorage
from ckptmgr.verify import Status, read_manifest, verify_checkpoint
from tests.helpers.format2 import write_format2_checkpoint

MiB = 1024 * 1024


def reference_digest(data: bytes) -> str:
    """docs/FORMAT.md, version 2: xxh3_128 of one chunk, else of the chunks' concatenated digests."""
    if len(data) <= CHUNK_BYTES:
        return xxhash.xxh3_128_hexdigest(data)
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    return xxhash.xxh3_128_hexdigest(b"".join(xxhash.xxh3_128_digest(c) for c in chunks))


@pytest.fixture(scope="module")
def blob() -> bytes:
    return random.Random(7).randbytes(2 * CHUNK_BYTES + 17)


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES + 17])
def test_chunked_digest_follows_the_definition(size, blob, tmp_path):
    data = blob[:size]
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(data)
    expected = reference_digest(data)
    for workers in (1, 3):
        assert hash_files([(path, size)], workers=workers) == [expected]
    # Fed in uneven pieces, as torch.save writes, the streaming hasher agrees.
    hasher = ChunkedHasher()
    rng = random.Random(size)
    position = 0
    while position < size:
        step = rng.choice([1, 100, 3 * MiB, 50 * MiB])
        hasher.update(memoryview(data)[position : position + step])
        position += step
    assert hasher.hexdigest() == expected and hasher.size == size
    assert hash_files([(path, size)], algorithm=PLAIN) == [xxhash.xxh3_128_hexdigest(data)]


def test_a_file_that_changed_size_is_reported_not_hashed(blob, tmp_path):
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(blob[:1000])
    (outcome,) = hash_files([(path, 2000)])
    assert isinstance(outcome, FileChanged)
    (missing,) = hash_files([(str(tmp_path / "gone"), 10)])
    assert isinstance(missing, FileNotFoundError)


def big_state() -> dict:
    """About 165 MB over three chunks, tensors of several dtypes, a view and non-tensor leaves."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4096, 1024, generator=generator)
    return {"w": torch.randn(32 * MiB, generator=generator), "half": torch.randn(8 * MiB).to(torch.bfloat16),
            "view": base[100:200], "ints": [torch.arange(1000), (torch.ones(3, dtype=torch.bool), 7)],
            "meta": {"lr": 0.1, "name": "x"}}


def torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    with _torch_crc32(False):
        torch.save(obj, buffer)
    return buffer.getvalue()


def test_parallel_writer_writes_exactly_what_torch_save_writes(tmp_path):
    state = big_state()
    with CheckpointManager(str(tmp_path / "run"), workers=3) as manager:
        checkpoint = manager.save(state, step=1)
    with open(checkpoint.path, "rb") as f:  # the checkpoint is the torch file itself
        written = f.read()
    expected = torch_save_bytes(state)
    assert len(expected) > 2 * CHUNK_BYTES
    assert written == expected
    (entry,) = checkpoint.manifest.files
    assert entry.xxh3_128 == reference_digest(expected) and entry.size == len(expected)
    assert verify_checkpoint(checkpoint.path).status is Status.VALID


class Holder:
    """Tensors inside an object the writer does not walk: their bytes must be copied, not referenced."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def test_tensors_the_writer_cannot_see_are_copied_and_written_intact(tmp_path):
    hidden = torch.randn(3 * MiB)
    state = {"visible": torch.randn(MiB), "holder": Holder(hidden)}
    with CheckpointManager(str(tmp_path / "run")) as manager:
        checkpoint = manager.save(state, step=1)
        loaded = manager.load(weights_only=False)
    assert torch.equal(loaded["holder"].tensor, hidden) and torch.equal(loaded["visible"], state["visible"])
    assert verify_checkpoint(checkpoint.path).status is Status.VALID


def test_a_state_that_contains_itself_is_saved(tmp_path):
    state: dict = {"w": torch.arange(10)}
    state["again"] = state
    with CheckpointManager(str(tmp_path / "run")) as manager:
        manager.save(state, step=1)
        loaded = manager.load(weights_only=False)
    assert loaded["again"] is loaded and torch.equal(loaded["w"], state["w"])


def test_a_flip_in_any_chunk_is_caught(tmp_path):
    run_dir = str(tmp_path / "run")
    with CheckpointManager(run_dir, keep_last=None) as manager:
        manager.save({"x": torch.zeros(1)}, step=1)
        newest = manager.save(big_state(), step=2)
    payload = newest.path
    size = os.path.getsize(payload)
    for offset in (CHUNK_BYTES + 5, size - 3):  # the middle chunk, the short last one
        with open(payload, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x10]))
        result = verify_checkpoint(newest.path)
        assert result.status is Status.CORRUPT and "xxh3_128 mismatch" in result.problems[0]
        with open(payload, "r+b") as f:  # undo, so the next offset is tested alone
            f.seek(offset)
            f.write(byte)
    assert verify_checkpoint(newest.path).status is Status.VALID


@pytest.mark.parametrize("action", ["raise", "enospc"])
def test_a_failure_in_any_chunk_write_publishes_nothing(action, tmp_path):
    run_dir = str(tmp_path / "run")
    with CheckpointManager(run_dir, keep_last=1) as manager:
        manager.save({"x": torch.zeros(1)}, step=1)
    state = big_state()
    chunks = -(-len(torch_save_bytes(state)) // CHUNK_BYTES)
    for at in range(1, chunks + 1):
        storage = FaultyStorage(Fault(at=at, action=action, op="write"))
        manager = CheckpointManager(run_dir, keep_last=1, storage=storage)
        with manager:
            expected = BaseException if action == "raise" else CommitError
            with pytest.raises(expected):
                manager.save(state, step=2)
        assert sorted(os.listdir(run_dir)) == [".ckptmgr", "last.ckpt", "step=1.ckpt"], at
        assert not os.listdir(os.path.join(run_dir, STAGING_DIR)), at  # no staging left
        assert [r.manifest.name for r in read_records(run_dir)] == ["last.ckpt", "step=1.ckpt"], at
        assert [op for op, _ in storage.ops].count("write") >= at
    with CheckpointManager(run_dir) as manager:
        assert manager.resolve().step == 1


def test_format_1_checkpoints_still_verify_with_their_whole_file_digest(tmp_path):
    """A checkpoint written by format 1 (plain xxh3_128 per file) verifies; the manifest says which digest."""
    run_dir = str(tmp_path / "run")
    path = write_format2_checkpoint(run_dir, 3, sequence=1, state=big_state(), version=1)
    manifest = read_manifest(path)
    assert manifest.hash_algorithm == PLAIN
    with open(os.path.join(path, MANIFEST_NAME), "rb") as f:
        assert b'"format_version": 1' in f.read()
    assert verify_checkpoint(path).status is Status.VALID
    with CheckpointManager(run_dir) as manager:
        assert manager.resolve().step == 3
    # Over 64 MiB the two definitions differ: the plain digest under format 2 is a mismatch.
    with open(os.path.join(path, MANIFEST_NAME), "wb") as f:
        f.write(dataclasses.replace(manifest, format_version=2).to_json_bytes())
    assert verify_checkpoint(path).status is Status.CORRUPT


def test_thread_fan_out_keeps_order_and_raises_the_first_error():
    from ckptmgr.hashing import map_in_threads

    assert map_in_threads(lambda x: x * x, list(range(100)), 4) == [x * x for x in range(100)]
    with pytest.raises(ZeroDivisionError):
        map_in_threads(lambda x: 1 / x, [1, 2, 0, 3], 3)
