"""storage: the write seam's positional writes and the read seam's refusals (symlinks, special files)."""

from __future__ import annotations

import errno
import os

import pytest

from ckptmgr.storage import LocalReader, LocalStorage


def test_write_at_writes_many_pieces_in_order(tmp_path):
    storage = LocalStorage()
    path = str(tmp_path / "f")
    pieces = [memoryview(bytes([i % 256]) * (i % 7 + 1)) for i in range(2000)]  # more pieces than one pwritev takes
    with storage.open_write(path) as f:
        storage.write_at(f, pieces, 10)
        storage.fsync(f)
    with open(path, "rb") as f:
        assert f.read() == b"\0" * 10 + b"".join(bytes(p) for p in pieces)


def test_open_write_never_writes_into_an_existing_file(tmp_path):
    (tmp_path / "f").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        LocalStorage().open_write(str(tmp_path / "f"))
    assert (tmp_path / "f").read_bytes() == b"keep"


def test_the_reader_refuses_symlinks_and_special_files(tmp_path):
    reader = LocalReader()
    (tmp_path / "real").write_bytes(b"data")
    os.symlink("real", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    assert reader.read_small(str(tmp_path / "real"), 2) == b"da"
    with pytest.raises(OSError) as info:
        reader.read_small(str(tmp_path / "link"), 10)
    assert info.value.errno == errno.ELOOP
    for method in (reader.read_small, lambda p, *a: os.close(reader.open_read(p))):
        with pytest.raises(OSError) as info:
            method(str(tmp_path / "fifo"), 10)  # never blocks waiting for a writer
        assert info.value.errno == errno.EINVAL


def test_rename_noreplace_refuses_an_existing_target(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    with pytest.raises(FileExistsError):
        LocalStorage().rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"b"
