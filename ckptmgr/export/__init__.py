"""``ckptmgr export``: a checkpoint to a consolidated state dict for inference.

Sources: a managed or legacy DeepSpeed ZeRO-1/2/3 checkpoint (Lightning's
``X.ckpt/checkpoint/`` or plain ``dir/<tag>/``), a PyTorch Distributed
Checkpoint (DCP) directory (``ckptmgr.dcp``, FSDP, Lightning's sharded saves),
or a single-file Lightning or torch checkpoint. The source is verified first and a corrupt one refused
(``force`` overrides, with a warning). The output is a directory published
atomically with a manifest, so ``ckptmgr verify OUT`` checks it later:

    OUT/model.safetensors                      (default)
    OUT/model-00001-of-00003.safetensors ...   + model.safetensors.index.json  (max_shard_bytes)
    OUT/pytorch_model.bin                      (fmt="bin"; built in memory, as torch.save needs)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..catalog import Checkpoint
from ..commit import ManifestFields, StagedCheckpoint, abandon
from ..dcp_layout import is_dcp_layout
from ..errors import CkptMgrError, InvalidCheckpointError, NotACheckpointError, PathNotFoundError, UsageError
from ..naming import LEGACY_STAGING_PREFIX, STATE_DIR, internal_name, new_token
from ..storage import LocalStorage
from ..verify import Status, has_manifest, read_manifest, verify_checkpoint
from .dcp import DcpReader
from .writers import SAFETENSORS_DTYPES, Planned, plan_shards, safetensors_header, write_tensor_bytes
from .zero import TensorSpec, ZeroReader, find_zero_dir

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "keep": None}


@dataclass
class ExportResult:
    path: str
    files: list[str]
    tensors: int
    parameters: int
    bytes: int
    seconds: float
    source: str
    source_kind: str


class _FileReader:
    """A single-file Lightning / torch checkpoint, memory-mapped."""

    def __init__(self, path: str, *, unsafe: bool):
        obj = _safe_load_file(path, unsafe=unsafe)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # Lightning
        elif isinstance(obj, dict) and isinstance(obj.get("module"), dict):
            obj = obj["module"]  # DeepSpeed model states
        if not isinstance(obj, dict):
            raise NotACheckpointError(path, "holds no state dict")
        self.state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not self.state:
            raise NotACheckpointError(path, "holds no tensors")

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in self.state.items()]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.state.items()


def _safe_load_file(path: str, *, unsafe: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=not unsafe)
    except Exception as exc:
        if unsafe:
            raise InvalidCheckpointError(path, f"cannot load: {exc.__class__.__name__}") from exc
        raise InvalidCheckpointError(path, f"refusing to unpickle: {str(exc).splitlines()[0][:200]}",
                                     hint="pass --unsafe-load only if you trust this file") from exc


def _check_source(src: str, force: bool) -> tuple[str, str, int]:
    """Verify the source; return (path to read, kind, step)."""
    if not os.path.lexists(src):
        raise PathNotFoundError(src, "no such checkpoint")
    if os.path.isdir(src) and not os.listdir(src):
        raise NotACheckpointError(src, "an empty directory is not a checkpoint")
    if os.path.isdir(src) and os.path.isdir(os.path.join(src, STATE_DIR)):
        raise UsageError(src, "this is a run directory", hint="pass one checkpoint in it (`ckptmgr resolve` "
                                                              "prints the newest)")
    result = verify_checkpoint(src)
    if not result.status.ok:
        if not force:
            raise InvalidCheckpointError(src, f"refusing to export a corrupt checkpoint: {result.reason}",
                                         hint="--force exports it anyway")
        log.warning("[ckptmgr] exporting %s although it does not verify (--force): %s", src, result.reason)
    manifest = result.manifest
    if manifest is None and os.path.isdir(src) and has_manifest(src):
        manifest = read_manifest(src)  # a corrupt format-2 checkpoint exported with --force
    if manifest is not None:
        return Checkpoint(os.path.abspath(src), manifest).load_path, f"managed {manifest.kind}", manifest.step
    return src, "legacy", 0


def export(src: str, out: str, *, fmt: str = "safetensors", dtype: str | None = None,
           strip_prefixes: tuple[str, ...] = (), select: tuple[str, ...] = (), max_shard_bytes: int | None = None,
           tag: str | None = None,
           force: bool = False, unsafe_load: bool = False, on_plan: Callable[[int], None] | None = None,
           on_tensor: Callable[[str, int], None] | None = None) -> ExportResult:
    started = time.monotonic()
    if fmt not in ("safetensors", "bin"):
        raise UsageError(None, f"unknown format {fmt!r} (safetensors or bin)")
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise UsageError(out, "already exists; export never overwrites", hint="choose a new output directory")
    if not os.path.isdir(os.path.dirname(out)):
        raise PathNotFoundError(os.path.dirname(out), "output's parent directory does not exist")
    inner, kind, step = _check_source(src, force)
    reader, zero_dir = _reader(src, inner, tag, unsafe_load, select)
    cast = DTYPES[dtype or ("fp32" if zero_dir else "keep")]
    specs = [spec for spec in reader.specs() if not select or spec.name.startswith(select)]
    if not specs:
        raise NotACheckpointError(src, f"no tensor name starts with {', '.join(select)}")
    planned = _plan(specs, cast, strip_prefixes, src)
    if fmt == "safetensors":
        unsupported = sorted({str(p.dtype) for p in planned if p.dtype not in SAFETENSORS_DTYPES})
        if unsupported:
            raise UsageError(src, f"safetensors has no dtype for {', '.join(unsupported)}",
                             hint="export with --format bin, or cast with --dtype")
    stem, suffix = ("model", ".safetensors") if fmt == "safetensors" else ("pytorch_model", ".bin")
    shards = plan_shards(planned, stem=stem, suffix=suffix, max_bytes=max_shard_bytes)
    if on_plan is not None:
        on_plan(sum(s.nbytes for s in shards))
    names = {p.name: p for p in planned}
    renamed = dict(zip((s.name for s in specs), (p.name for p in planned), strict=True))

    fields = ManifestFields(step=step, kind="export", load_path=shards[0].filename if len(shards) == 1 else
                            f"{stem}{suffix}.index.json",
                            metadata={"source": os.path.abspath(src), "source_kind": kind, "format": fmt,
                                      "dtype": str(cast or "keep"), "zero_stage": getattr(reader, "stage", None)})
    parent, name = os.path.split(out)
    token = new_token()
    staged = StagedCheckpoint(LocalStorage(), parent, name, token, fields,
                              path=os.path.join(parent, f"{LEGACY_STAGING_PREFIX}{internal_name(name, token)}"))
    staged.create()
    try:
        stream = ((renamed[n], _cast(t, cast)) for n, t in reader.tensors() if n in renamed)
        _write(staged, shards, names, stream, fmt, on_tensor)
        if len(shards) > 1:
            _write_index(staged, shards, stem, suffix)
        staged.finalize_standalone()
    except BaseException:
        abandon(staged.storage, staged.path)
        raise
    params = sum(p.nbytes // torch.empty((), dtype=p.dtype).element_size() for p in planned)
    return ExportResult(path=out, files=[s.filename for s in shards], tensors=len(planned), parameters=params,
                        bytes=sum(s.nbytes for s in shards), seconds=round(time.monotonic() - started, 3),
                        source=os.path.abspath(src), source_kind=kind + _format_note(reader, zero_dir, kind))


def _format_note(reader: Any, zero_dir: str | None, kind: str) -> str:
    if zero_dir:
        return f" ZeRO-{reader.stage}"
    if isinstance(reader, DcpReader):
        skipped = reader.skipped_non_tensors
        return ("" if kind.endswith("dcp") else " DCP") + (f", {skipped} non-tensor entries left out" if skipped
                                                          else "")
    return ""


def _reader(src: str, inner: str, tag: str | None, unsafe_load: bool,
            select: tuple[str, ...]) -> tuple[Any, str | None]:
    """The reader for what ``inner`` holds (and the ZeRO directory, when it is one)."""
    if os.path.isdir(inner) and is_dcp_layout(inner):
        return DcpReader(inner, select=select), None
    zero_dir = find_zero_dir(inner, tag)
    if zero_dir:
        return ZeroReader(zero_dir, unsafe=unsafe_load), zero_dir
    if not os.path.isfile(inner):
        raise NotACheckpointError(src, "neither a ZeRO checkpoint, a DCP checkpoint nor a single-file checkpoint")
    return _FileReader(inner, unsafe=unsafe_load), None


def _plan(specs: list[TensorSpec], cast: torch.dtype | None, prefixes: tuple[str, ...], src: str) -> list[Planned]:
    planned, seen = [], set()
    for spec in specs:
        name = spec.name
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name in seen:
            raise UsageError(src, f"two tensors are named {name!r} after --strip-prefix")
        seen.add(name)
        dtype = cast if cast is not None and spec.dtype.is_floating_point else spec.dtype
        planned.append(Planned(name, spec.shape, dtype))
    return planned


def _cast(tensor: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    return tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor


def _write(staged: StagedCheckpoint, shards, names, stream, fmt: str, on_tensor) -> None:
    for shard in shards:
        if fmt == "bin":
            state = {}
            for _ in shard.tensors:
                name, tensor = next(stream)
                # A copy: torch.save writes a view's whole storage (a whole flat ZeRO group).
                state[name] = tensor.clone()
            with staged.open_file(shard.filename) as f:
                torch.save(state, f)
            if on_tensor:
                for t in shard.tensors:
                    on_tensor(t.name, t.nbytes)
            continue
        with staged.open_file(shard.filename) as f:
            f.write(safetensors_header(shard.tensors, {"format": "pt"}))
            for planned in shard.tensors:
                name, tensor = next(stream)
                if name != planned.name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
                    raise CkptMgrError(staged.path, f"tensor {name} does not match its plan ({planned})")
                write_tensor_bytes(f, tensor)
                if on_tensor:
                    on_tensor(name, planned.nbytes)


def _write_index(staged: StagedCheckpoint, shards, stem: str, suffix: str) -> None:
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
             "weight_map": {t.name: s.filename for s in shards for t in s.tensors}}
    with staged.open_file(f"{stem}{suffix}.index.json") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True).encode())


__all__ = ["ExportResult", "Status", "export"]
