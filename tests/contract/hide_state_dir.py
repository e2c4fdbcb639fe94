"""A pytest plugin for the contract run: directory listings do not show ckptmgr's hidden `.ckptmgr/` entry.

Lightning's tests compare `os.listdir(dirpath)` with the checkpoints they expect; ckptmgr keeps its
commit records in `dirpath/.ckptmgr/`, so those comparisons fail on that one entry alone. Running the
suite a second time with listings that leave the entry out tells a test whose only failing assertion is
that entry from one that fails for any other reason. It changes what the tests see, not what ckptmgr
does: ckptmgr never needs to see `.ckptmgr` as an entry of the directory it lists.
"""

from __future__ import annotations

import os
import pathlib

HIDDEN = ".ckptmgr"
_listdir, _scandir, _iterdir = os.listdir, os.scandir, pathlib.Path.iterdir


def _listdir_hiding(path="."):
    if isinstance(path, int):  # by descriptor: shutil.rmtree's walk, which must see everything
        return _listdir(path)
    return [name for name in _listdir(path) if name != HIDDEN]


class _Entries:
    def __init__(self, inner):
        self._inner = inner

    def __iter__(self):
        return (entry for entry in self._inner if entry.name != HIDDEN)

    def __next__(self):
        while True:
            entry = next(self._inner)
            if entry.name != HIDDEN:
                return entry

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._inner.close()

    def close(self):
        self._inner.close()


def _scandir_hiding(path="."):
    if isinstance(path, int):  # by descriptor: shutil.rmtree's walk, which must see everything
        return _scandir(path)
    return _Entries(_scandir(path))


def _iterdir_hiding(self):
    return (p for p in _iterdir(self) if p.name != HIDDEN)


os.listdir = _listdir_hiding
os.scandir = _scandir_hiding
pathlib.Path.iterdir = _iterdir_hiding
