"""How a run directory can hold the ``last`` alias: what its filesystem supports, probed once.

Two styles of alias exist, after Lightning's ``save_last``:

- ``copy`` (``save_last=True``, the manager's ``last.ckpt``): the alias is a
  checkpoint in its own right, a regular file any tool opens. It is a hard
  link to the newest checkpoint (no byte written twice) with its own commit
  record; where hard links are not supported, a real copy.
- ``link`` (``save_last="link"``): a symlink, as Lightning makes it; where
  symlinks are not supported, the ``copy`` style instead.

Some filesystems (FUSE layers, object-store mounts) refuse one kind of link
or the other. The writer probes once per run directory, inside ``.ckptmgr/``,
and records the answer in ``.ckptmgr/links.json`` for later writers and for
``ckptmgr list``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from .naming import STATE_DIR, new_token
from .storage import Storage

LINKS_NAME = "links.json"
COPY, LINK = "copy", "link"
HARDLINK, SYMLINK, FULL_COPY = "hardlink", "symlink", "full-copy"


@dataclass(frozen=True)
class LinkSupport:
    hardlink: bool
    symlink: bool

    def kind_for(self, style: str, *, directory: bool) -> str:
        """How to make an alias of ``style`` to a file or a directory here."""
        if style == LINK and self.symlink:
            return SYMLINK
        if self.hardlink:
            return HARDLINK  # a directory becomes a directory of hard links
        return FULL_COPY


def links_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATE_DIR, LINKS_NAME)


def read_support(run_dir: str) -> LinkSupport | None:
    """What an earlier writer found, or None."""
    try:
        with open(links_path(run_dir), "rb") as f:
            data = json.loads(f.read(4096))
        return LinkSupport(hardlink=data["hardlink"] is True, symlink=data["symlink"] is True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def probe(storage: Storage, run_dir: str) -> LinkSupport:
    """Try a hard link and a symlink inside ``.ckptmgr/`` once; remember the answer."""
    known = read_support(run_dir)
    if known is not None:
        return known
    state = os.path.join(run_dir, STATE_DIR)
    token = new_token()
    source = os.path.join(state, f".probe.{token}")
    results = {}
    try:
        with open(source, "wb"):
            pass
        for kind, make in ((HARDLINK, storage.link), (SYMLINK, lambda s, d: storage.symlink(os.path.basename(s), d))):
            target = f"{source}.{kind}"
            try:
                make(source, target)
                results[kind] = True
            except OSError:
                results[kind] = False
            finally:
                if os.path.lexists(target):
                    os.unlink(target)
    finally:
        if os.path.lexists(source):
            os.unlink(source)
    support = LinkSupport(hardlink=results[HARDLINK], symlink=results[SYMLINK])
    tmp = f"{links_path(run_dir)}.{token}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(asdict(support), f)
        os.replace(tmp, links_path(run_dir))
    except OSError:
        pass  # probed again next time
    return support
