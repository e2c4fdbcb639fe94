"""Reading a DeepSpeed ZeRO checkpoint as a stream of consolidated fp32 tensors.

This follows DeepSpeed's own reconstruction (``deepspeed/utils/zero_to_fp32.py``)
step for step, so the tensors are bitwise equal to
``get_fp32_state_dict_from_zero_checkpoint``; what differs is memory. The
optimizer shards are memory-mapped, and each parameter is assembled only when
it is asked for, from the slices of the flat fp32 partitions that hold it.
Mapped pages once read would stay in the process's resident set; the pages of
the partitions already consumed are handed back (:class:`_PageReleaser`), so
peak memory is about one parameter, not the whole model (nor, for ZeRO-2,
twice the model).
"""

from __future__ import annotations

import bisect
import enum
import math
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidCheckpointError, NotACheckpointError

_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_MODEL3 = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$")


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_zero_dir(src: str, tag: str | None) -> str | None:
    """The directory holding ``*_optim_states.pt``: ``src``, ``src/<tag>``, or ``src/<latest>``."""
    if not os.path.isdir(src):
        return None
    if any(_OPTIM.search(n) for n in os.listdir(src)):
        return src
    if tag is None and os.path.isfile(os.path.join(src, "latest")):
        with open(os.path.join(src, "latest")) as f:
            tag = f.read().strip()
    for candidate in ([tag] if tag else []) + ["checkpoint"]:
        path = os.path.join(src, candidate)
        if os.path.isdir(path) and any(_OPTIM.search(n) for n in os.listdir(path)):
            return path
    return None


def _safe_load(path: str, *, unsafe: bool) -> Any:
    """torch.load with weights_only, allowing DeepSpeed's own plain-data classes."""
    if unsafe:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    allowed = _deepspeed_safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError for refused globals
        raise InvalidCheckpointError(path, f"refusing to unpickle: {str(exc).splitlines()[0][:200]}",
                                     hint="pass --unsafe-load only if you trust this file") from exc


class _ZeroStage(enum.IntEnum):
    """Stands in for deepspeed.runtime.zero.config.ZeroStageEnum (same values)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _InertRecord:
    """Stands in for DeepSpeed's plain-data classes: keeps what it is given, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's classes found in its optimizer shards, mapped to inert stand-ins.

    The weights-only unpickler looks them up by name; nothing of DeepSpeed is imported or run,
    so export works without DeepSpeed installed and loads only data.
    """
    return [(_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
            (type("LossScaler", (_InertRecord,), {}), "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
            (type("fragment_address", (_InertRecord,), {}), "deepspeed.utils.tensor_fragment.fragment_address")]


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class ZeroReader:
    """Consolidated tensors of a ZeRO-1/2/3 checkpoint directory, one at a time."""

    def __init__(self, zero_dir: str, *, unsafe: bool = False):
        self.zero_dir = zero_dir
        names = os.listdir(zero_dir)
        optim = sorted((n for n in names if _OPTIM.search(n)), key=_natural)
        if not optim:
            raise NotACheckpointError(zero_dir, "no *_optim_states.pt files: not a ZeRO checkpoint")
        first = _safe_load(os.path.join(zero_dir, optim[0]), unsafe=unsafe)["optimizer_state_dict"]
        self.stage = int(first["zero_stage"])
        count = first["partition_count"]
        self.world_size = max(count) if isinstance(count, list) else int(count)
        if self.world_size != len(optim):
            raise InvalidCheckpointError(zero_dir, f"expected {self.world_size} optimizer shards, found {len(optim)}"
                                         " (a rank's shard is missing or an old one is left over)")
        model_files = (sorted((n for n in names if _MODEL3.search(n)), key=_natural) if self.stage == 3
                       else ["mp_rank_00_model_states.pt"])
        self.model_states = [_safe_load(os.path.join(zero_dir, n), unsafe=unsafe) for n in model_files]
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        self.flat = [first[key]] + [
            _safe_load(os.path.join(zero_dir, n), unsafe=unsafe)["optimizer_state_dict"][key] for n in optim[1:]]
        self.paddings = first.get("param_alignment_paddings")
        self.shared = list(self.model_states[0]["shared_params"].items())
        self._releaser = _PageReleaser([os.path.join(zero_dir, n) for n in optim])

    # -- what will be produced -------------------------------------------
    def specs(self) -> list[TensorSpec]:
        state = self.model_states[0]
        specs = [TensorSpec(n, tuple(t.shape), torch.float32 if t.is_floating_point() else t.dtype)
                 for n, t in state["module"].items() if n in state["buffer_names"]]
        for name, shape in (state.get("frozen_param_shapes") or {}).items():
            specs.append(TensorSpec(name, tuple(shape), torch.float32))
        for group in state["param_shapes"]:
            specs += [TensorSpec(name, tuple(shape), torch.float32) for name, shape in group.items()]
        produced = {s.name: s for s in specs}
        specs += [TensorSpec(alias, produced[target].shape, produced[target].dtype)
                  for alias, target in self.shared if target in produced]
        return specs

    # -- producing them ---------------------------------------------------
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in ``specs()`` order; each tensor is a fresh copy or a view of mapped data."""
        state = self.model_states[0]
        targets = {target for _, target in self.shared}
        kept: dict[str, torch.Tensor] = {}  # only what shared parameters point to is held on to
        buffers = ((n, t.float() if t.is_floating_point() else t) for n, t in state["module"].items()
                   if n in state["buffer_names"])
        trainable = self._zero3_params() if self.stage == 3 else self._zero2_params()
        for stream in (buffers, self._frozen(), trainable):
            for name, tensor in stream:
                if name in targets:
                    kept[name] = tensor
                yield name, tensor
        for alias, target in self.shared:
            if target in kept:
                yield alias, kept[target]

    def _frozen(self) -> Iterator[tuple[str, torch.Tensor]]:
        shapes = self.model_states[0].get("frozen_param_shapes") or {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if self.stage == 3:
                parts = [ms["frozen_param_fragments"][name] for ms in self.model_states]
                yield name, torch.cat(parts, 0)[:numel].view(shape)
            else:
                yield name, self.model_states[0]["frozen_param_fragments"][name]

    def _zero2_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each group is the concatenation of every rank's partition; params lie in it in order."""
        for group, shapes in enumerate(self.model_states[0]["param_shapes"]):
            parts = [rank_groups[group] for rank_groups in self.flat]
            bounds = [0]
            for part in parts:
                bounds.append(bounds[-1] + part.numel())
            offset = 0
            paddings = self.paddings[group] if self.paddings is not None else None
            consumed = _Consumed(self._releaser, parts, bounds)
            for index, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                yield name, _slice_of_concatenation(parts, bounds, offset, numel).view(shape)
                offset += numel + (paddings[index] if paddings is not None else 0)
                consumed.until(offset)
            align = 2 * self.world_size
            if align * math.ceil(offset / align) != align * math.ceil(bounds[-1] / align):
                raise InvalidCheckpointError(self.zero_dir, f"consumed {offset} of {bounds[-1]} elements")

    def _zero3_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each param is split across ranks (padded); rank r holds slice r of it in its flat groups."""
        shapes = {k: v for group in self.model_states[0]["param_shapes"] for k, v in group.items()}
        group_bounds = [0]
        for tensor in self.flat[0]:
            group_bounds.append(group_bounds[-1] + tensor.numel())
        offset = 0
        consumed = [_Consumed(self._releaser, rank_groups, group_bounds) for rank_groups in self.flat]
        for name, shape in shapes.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / self.world_size)
            pieces = [_slice_of_concatenation(rank_groups, group_bounds, offset, per_rank)
                      for rank_groups in self.flat]
            yield name, torch.cat(pieces, 0)[:numel].view(shape)
            offset += per_rank
            for rank in consumed:
                rank.until(offset)
        if offset != group_bounds[-1]:
            raise InvalidCheckpointError(self.zero_dir, f"consumed {offset} of {group_bounds[-1]} elements per rank")


def _slice_of_concatenation(parts: list[torch.Tensor], bounds: list[int], start: int, numel: int) -> torch.Tensor:
    """``torch.cat(parts)[start:start+numel]`` without building the concatenation."""
    end = start + numel
    pieces = []
    for part, lo, hi in zip(parts, bounds, bounds[1:], strict=False):
        if hi <= start or lo >= end:
            continue
        pieces.append(part[max(start, lo) - lo : min(end, hi) - lo])
    if not pieces:
        return parts[0][:0]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)


class _PageReleaser:
    """Hands the pages of memory-mapped shard data back to the OS once consumed.

    ``madvise(MADV_DONTNEED)`` drops pages from this process's resident set; on a
    file mapping that was never written, a later access simply reads the file
    again, so nothing is lost. On anonymous memory it would zero the data, so a
    range is released only if it lies inside a mapping of one of the shard files
    (checked against /proc/self/maps). Elsewhere (no /proc, not Linux) it does
    nothing and export still works, with a larger resident set.
    """

    def __init__(self, paths: list[str]):
        self._ranges: list[tuple[int, int]] = []
        self._madvise = None
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        wanted = {os.path.realpath(p) for p in paths}
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].rstrip("\n") in wanted:
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        self._ranges.append((start, end))
        except OSError:
            return
        self._ranges.sort()
        self._starts = [start for start, _ in self._ranges]
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._madvise = libc.madvise

    def release(self, start: int, end: int) -> None:
        """Release the whole pages within [start, end) (addresses), if they belong to a shard mapping."""
        start = start - start % mmap.PAGESIZE
        end = end - end % mmap.PAGESIZE
        if self._madvise is None or end <= start:
            return
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or end > self._ranges[i][1]:
            return  # not (wholly) a shard file's mapping: leave it alone
        self._madvise(start, end - start, mmap.MADV_DONTNEED)


class _Consumed:
    """How far a reader has consumed a list of flat partitions (their concatenation), releasing pages behind it."""

    def __init__(self, releaser: _PageReleaser, parts: list[torch.Tensor], bounds: list[int]):
        self._releaser, self._parts, self._bounds = releaser, parts, bounds
        self._done = 0  # elements of the concatenation already released

    def until(self, upto: int) -> None:
        for part, lo, hi in zip(self._parts, self._bounds, self._bounds[1:], strict=False):
            if hi <= self._done or lo >= upto:
                continue
            first, last = max(self._done, lo) - lo, min(upto, hi) - lo
            size = part.element_size()
            self._releaser.release(part.data_ptr() + first * size, part.data_ptr() + last * size)
        self._done = max(self._done, upto)
