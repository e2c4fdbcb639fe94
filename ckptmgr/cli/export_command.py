"""``ckptmgr export``: a checkpoint (ZeRO shards or one file) to a consolidated state dict."""

from __future__ import annotations

import argparse
import re

from ..errors import UsageError
from .output import LazyBar, Output, human_bytes

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"2GiB"`` -> 2_147_483_648; plain numbers are bytes."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if unit is not None and unit and not unit.endswith("B"):
        unit += "B"
    if match is None or unit not in _UNITS:
        raise UsageError(None, f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="consolidate a checkpoint into a state dict for inference",
                       description="Verify SRC (refusing a corrupt one unless --force), then write its consolidated "
                                   "fp32 weights to the new directory OUT: model.safetensors (streamed, one tensor in "
                                   "memory at a time), sharded safetensors with an index (--max-shard-size), or "
                                   "pytorch_model.bin (--format bin). SRC: a DeepSpeed ZeRO-1/2/3 checkpoint "
                                   "(Lightning's X.ckpt/ or DeepSpeed's dir/ with `latest`), a PyTorch Distributed "
                                   "Checkpoint directory (.metadata + *.distcp: ckptmgr.dcp, FSDP, Lightning's sharded "
                                   "saves; every tensor, optimizer state included, unless --select), managed or not, "
                                   "or a single-file Lightning/torch checkpoint. OUT is published atomically with a "
                                   "manifest.")
    p.add_argument("src")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist)")
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    p.add_argument("--max-shard-size", type=parse_size, default=None, help="split into files of at most this size")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "keep"], default=None,
                   help="cast floating tensors (default: fp32 for ZeRO, keep for single files)")
    p.add_argument("--strip-prefix", action="append", default=[], metavar="PREFIX",
                   help="remove this prefix from tensor names (e.g. 'model.' or '_forward_module.'); repeatable")
    p.add_argument("--select", action="append", default=[], metavar="PREFIX",
                   help="export only tensors whose name starts with PREFIX (e.g. 'model.' of a DCP checkpoint, to "
                        "leave the optimizer state out); repeatable; applied before --strip-prefix")
    p.add_argument("--tag", default=None, help="DeepSpeed tag directory (default: from `latest`)")
    p.add_argument("--force", action="store_true", help="export even if SRC does not verify (warns)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle without weights_only (only for files you trust)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    from ..export import export

    bar = LazyBar(out, "exporting")
    try:
        result = export(args.src, args.output, fmt=args.format, dtype=args.dtype,
                        strip_prefixes=tuple(args.strip_prefix), select=tuple(args.select),
                        max_shard_bytes=args.max_shard_size,
                        tag=args.tag, force=args.force, unsafe_load=args.unsafe_load, on_plan=bar.start,
                        on_tensor=lambda name, n: bar.advance(n))
    finally:
        bar.close()
    data = vars(result)
    out.result(data, lambda d: out.console.print(
        f"exported {d['source']} ({d['source_kind']}) -> {d['path']}: {d['tensors']} tensors, "
        f"{d['parameters']:,} parameters, {human_bytes(d['bytes'])} in {len(d['files'])} file(s), "
        f"{d['seconds']:.1f} s", markup=False))
    return 0
