"""Export hands the pages of consumed shard data back to the OS, and only pages of shard files."""

from __future__ import annotations

import torch

from ckptmgr.export.zero import _PageReleaser

MiB = 1024 * 1024


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_consumed_pages_of_a_mapped_shard_leave_the_resident_set_and_still_read_back(tmp_path):
    path = str(tmp_path / "shard.pt")
    original = torch.randn(32 * MiB // 4)
    torch.save({"flat": original}, path)
    flat = torch.load(path, mmap=True, weights_only=True)["flat"]
    assert torch.equal(flat, original)  # touches every page of the mapping
    before = resident_bytes()
    _PageReleaser([path]).release(flat.data_ptr(), flat.data_ptr() + flat.numel() * 4)
    assert before - resident_bytes() > 24 * MiB
    assert torch.equal(flat, original)  # released pages are read from the file again


def test_memory_that_is_not_a_shard_mapping_is_never_released(tmp_path):
    shard = str(tmp_path / "shard.pt")
    torch.save({"flat": torch.ones(4 * MiB)}, shard)
    mapped = torch.load(shard, mmap=True, weights_only=True)["flat"]
    releaser = _PageReleaser([shard])
    anonymous = torch.randn(8 * MiB)
    expected = anonymous.clone()
    releaser.release(anonymous.data_ptr(), anonymous.data_ptr() + anonymous.numel() * 4)
    # A range running past the end of the shard's mapping is refused as a whole.
    releaser.release(mapped.data_ptr(), mapped.data_ptr() + 64 * MiB)
    assert torch.equal(anonymous, expected)  # MADV_DONTNEED on anonymous memory would have zeroed it
    assert bool((mapped == 1).all())
