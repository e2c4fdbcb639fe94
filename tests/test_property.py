"""Property: for any set of corruptions over N checkpoints, resolve picks exactly the newest intact one.

Damage reaches the bytes and the commit records; extra records of a name (one an interrupted save over
it left, one a replaced checkpoint left) never change what is intact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptmgr import CheckpointManager
from ckptmgr.catalog import resolve
from ckptmgr.naming import MANIFESTS_DIR, STAGING_DIR
from ckptmgr.records import read_records
from tests.helpers.files import resigned

DAMAGE = ["none", "flip", "truncate", "delete-payload", "delete-record", "garble-record", "superseded-record",
          "unpublished-record"]
INTACT = {"none", "superseded-record", "unpublished-record"}


def _record(run_dir: str, name: str) -> str:
    (path,) = [r.path for r in read_records(run_dir) if r.manifest is not None and r.manifest.name == name]
    return path


def _other_record(run_dir: str, name: str, *, sequence_delta: int, token: str) -> str:
    """A second record of ``name`` describing other bytes (a save over the name that was interrupted, or
    the record of the bytes it replaced)."""
    body = json.loads(open(_record(run_dir, name), "rb").read())
    body["sequence"] += sequence_delta
    body["files"][0]["xxh3_128"] = "0" * 32
    path = os.path.join(run_dir, MANIFESTS_DIR, f"{name}.{token}.json")
    with open(path, "wb") as f:
        f.write(resigned(body))
    return path


def _damage(run_dir: str, name: str, kind: str, offset_fraction: float) -> None:
    payload = os.path.join(run_dir, name)
    if kind == "flip":
        size = os.path.getsize(payload)
        offset = min(size - 1, int(size * offset_fraction))
        with open(payload, "r+b") as f:
            f.seek(offset)
            b = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([b ^ 0x80]))
    elif kind == "truncate":
        with open(payload, "r+b") as f:
            f.truncate(int(os.path.getsize(payload) * offset_fraction))
    elif kind == "delete-payload":
        os.unlink(payload)
    elif kind == "delete-record":
        os.unlink(_record(run_dir, name))
    elif kind == "garble-record":
        record = _record(run_dir, name)
        with open(record, "r+b") as f:
            f.seek(int(os.path.getsize(record) * offset_fraction))
            f.write(b"\x00garbage")
    elif kind == "superseded-record":
        _other_record(run_dir, name, sequence_delta=-100, token="00000001")
    elif kind == "unpublished-record":
        _other_record(run_dir, name, sequence_delta=100, token="00000002")
        os.makedirs(os.path.join(run_dir, STAGING_DIR), exist_ok=True)
        open(os.path.join(run_dir, STAGING_DIR, f"{name}.00000002"), "wb").close()


_TEMPLATE: dict[int, str] = {}


def _template(n: int) -> str:
    """One pristine run of n checkpoints per n, copied for each example."""
    if n not in _TEMPLATE:
        import torch

        root = tempfile.mkdtemp(prefix="ckptmgr-prop-")
        with CheckpointManager(os.path.join(root, "run"), keep_last=None, last_alias=None) as m:
            for step in range(1, n + 1):
                m.save({"x": torch.arange(step * 100)}, step=step * 10, epoch=step // 3)
        _TEMPLATE[n] = os.path.join(root, "run")
    return _TEMPLATE[n]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), n=st.integers(min_value=1, max_value=6))
def test_resolve_picks_newest_intact(tmp_path_factory, data, n):
    run_dir = str(tmp_path_factory.mktemp("prop") / "run")
    shutil.copytree(_template(n), run_dir, symlinks=True)
    damages = data.draw(st.lists(st.sampled_from(DAMAGE), min_size=n, max_size=n))
    fractions = data.draw(st.lists(st.floats(0.0, 0.999), min_size=n, max_size=n))
    names = sorted((d for d in os.listdir(run_dir) if d.startswith("epoch=")),
                   key=lambda d: int(d.split("step=")[1].split(".")[0]))
    for name, kind, fraction in zip(names, damages, fractions, strict=False):
        _damage(run_dir, name, kind, fraction)
    intact = [name for name, kind in zip(names, damages, strict=False) if kind in INTACT]
    found = resolve(run_dir)
    if intact:
        assert found is not None and found.name == intact[-1]
    else:
        assert found is None
