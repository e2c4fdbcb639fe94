"""``ckptmgr verify | list | resolve | seal``: the store's commands.

verify, list and resolve only read: they never modify anything, never
unpickle, and never import torch.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import catalog
from ..errors import NotACheckpointError, PathNotFoundError
from ..manifest import MANIFEST_NAME
from ..verify import Status, VerifyResult, has_manifest, is_deepspeed_layout, path_size, verify_checkpoint
from .output import Output, human_age, human_bytes

EXIT_OK, EXIT_INVALID = 0, 1


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("verify", parents=[common], help="verify a checkpoint or every checkpoint of a run directory",
                       description="Check every file's size and xxh3_128 against the manifest (managed checkpoints) "
                                   "or every record's CRC32 (legacy torch/Lightning/DeepSpeed checkpoints). "
                                   "Exit 0: all valid; 1: something invalid; 2: usage or path not found.")
    p.add_argument("path", help="a checkpoint (file or directory) or a run directory")
    p.add_argument("--quick", action="store_true", help="manifests and sizes only, no hashing")
    p.add_argument("--workers", type=int, default=None, help="hashing threads (default: cores, at most 8)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("list", parents=[common], help="list a run directory's checkpoints and what resume would pick",
                       description="Every candidate with step, epoch, sequence, size, age and status, newest first; "
                                   "the one resume would pick is marked. Exit 0 when resume has a pick, else 1.")
    p.add_argument("run_dir")
    p.add_argument("--quick", action="store_true", help="manifests and sizes only, no hashing")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("resolve", parents=[common], help="print the checkpoint path resume would load",
                       description="Print the load path of the newest checkpoint that verifies "
                                   "(for trainer.fit(ckpt_path=...)). Exit 1 if none is valid.")
    p.add_argument("run_dir")
    p.add_argument("--quick", action="store_true", help="trust sizes, skip hashing")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("seal", parents=[common], help="adopt a legacy checkpoint into the managed format",
                       description="Check a legacy checkpoint's zip CRC32s, then give it a manifest: a DeepSpeed "
                                   "directory is sealed in place; a single file X becomes the directory X/ holding "
                                   "checkpoint.pt. Refuses corrupt checkpoints.")
    p.add_argument("path")
    p.add_argument("--step", type=int, default=None, help="step, when the name has no step=N")
    p.add_argument("--epoch", type=int, default=None, help="epoch, when the name has no epoch=N")
    p.add_argument("--allow-unchecked", action="store_true", help="seal old pickle-format files that carry no CRC")
    p.set_defaults(func=cmd_seal)


# -- verify ---------------------------------------------------------------
def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    paths = _verify_targets(args.path)
    results: list[VerifyResult] = []
    total = sum(path_size(os.path.realpath(p)) for p in paths) if not args.quick else 0
    with out.progress("verifying", total) as advance:
        for path in paths:
            results.append(verify_checkpoint(path, quick=args.quick, workers=args.workers, on_bytes=advance))
    data = {
        "path": os.path.abspath(args.path),
        "mode": "quick" if args.quick else "full",
        "all_valid": all(r.status.ok for r in results),
        "checkpoints": [_result_dict(r) for r in results],
    }
    out.result(data, lambda d: _render_verify(out, results))
    return EXIT_OK if data["all_valid"] else EXIT_INVALID


def _verify_targets(path: str) -> list[str]:
    """A checkpoint verifies alone; a run directory verifies each of its candidates."""
    if not os.path.lexists(path):
        raise PathNotFoundError(path, "no such file or directory")
    if not os.path.isdir(path) or has_manifest(path) or is_deepspeed_layout(path):
        return [path]
    names = [c.path for c in catalog.scan(path) if c.alias_of is None]
    if not names:
        raise NotACheckpointError(path, "no checkpoints here (not a checkpoint, not a run directory)")
    return names


def _result_dict(r: VerifyResult) -> dict[str, Any]:
    m = r.manifest
    return {
        "path": r.path,
        "name": os.path.basename(r.path),
        "status": r.status.value,
        "valid": r.status.ok,
        "problems": r.problems,
        "extra_files": r.extra_files,
        "step": m.step if m else None,
        "epoch": m.epoch if m else None,
        "sequence": m.sequence if m else None,
        "bytes": m.total_bytes if m else None,
        "files": len(m.files) if m else None,
        "bytes_hashed": r.bytes_hashed,
    }


def _render_verify(out: Output, results: list[VerifyResult]) -> None:
    for r in results:
        out.line(f"{r.status.value:>16}  {r.path}", style="green" if r.status.ok else "red")
        for problem in r.problems:
            out.line(f"{'':>18}{problem}")
        for extra in r.extra_files:
            out.line(f"{'':>18}note: {extra}: not listed in the manifest")
    bad = sum(not r.status.ok for r in results)
    out.line(f"{len(results)} checked, {bad} invalid")


# -- list -----------------------------------------------------------------
def list_rows(run_dir: str, *, quick: bool) -> tuple[list[dict[str, Any]], str | None]:
    """One row per candidate (newest first) and the name resume would pick."""
    rows, pick = [], None
    for c in catalog.scan(run_dir):
        row: dict[str, Any] = {"name": c.name, "path": c.path, "step": c.step, "epoch": c.epoch,
                               "sequence": c.manifest.sequence if c.manifest else None,
                               "bytes": c.manifest.total_bytes if c.manifest else (
                                   None if c.alias_of else path_size(c.path)),
                               "created_unix": c.manifest.created_unix if c.manifest else None,
                               "alias_of": c.alias_of, "problems": [], "resume": False}
        if c.alias_of is not None:
            row["status"] = "alias"
            target = os.path.join(run_dir, c.alias_of)
            if not os.path.lexists(target):
                row["status"], row["problems"] = "dangling-alias", [f"points to missing {c.alias_of}"]
        elif c.manifest is None and not c.legacy:
            status = Status.INCOMPLETE if (c.problem or "").startswith("no manifest") else Status.CORRUPT
            row["status"], row["problems"] = status.value, [c.problem]
        else:
            result = verify_checkpoint(c.path, quick=quick)
            row["status"], row["problems"] = result.status.value, result.problems
            if pick is None and result.status is Status.VALID:
                pick, row["resume"] = c.name, True
        rows.append(row)
    return rows, pick


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    rows, pick = list_rows(args.run_dir, quick=args.quick)
    data = {"run_dir": os.path.abspath(args.run_dir), "resume": pick, "checkpoints": rows}
    out.result(data, lambda d: _render_list(out, rows, pick))
    return EXIT_OK if pick is not None else EXIT_INVALID


def _render_list(out: Output, rows: list[dict[str, Any]], pick: str | None) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("", "name", "step", "epoch", "seq", "size", "age", "status"):
        table.add_column(col, justify="right" if col in ("step", "epoch", "seq", "size") else "left", no_wrap=True)
    for row in rows:
        status = row["status"]
        colour = "green" if status in ("valid", "legacy-ok") else "dim" if status == "alias" else "red"
        shown = f"-> {row['alias_of']}" if row["alias_of"] else status
        table.add_row("*" if row["resume"] else "", row["name"], _dash(row["step"]), _dash(row["epoch"]),
                      _dash(row["sequence"]), human_bytes(row["bytes"]), human_age(row["created_unix"]),
                      f"[{colour}]{shown}[/]")
    out.console.print(table)
    for row in rows:
        for problem in row["problems"]:
            out.console.print(f"  {row['name']}: {problem}", markup=False)
    out.console.print(f"resume would pick: {pick or 'nothing (no valid checkpoint)'}")


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


# -- resolve --------------------------------------------------------------
def cmd_resolve(args: argparse.Namespace, out: Output) -> int:
    skipped: list[dict[str, str]] = []
    found = catalog.resolve(args.run_dir, quick=args.quick,
                            on_skip=lambda c, reason: skipped.append({"path": c.path, "reason": reason}))
    data = {
        "run_dir": os.path.abspath(args.run_dir),
        "path": found.path if found else None,
        "load_path": found.load_path if found else None,
        "step": found.step if found else None,
        "epoch": found.epoch if found else None,
        "skipped": skipped,
    }
    if not out.as_json:
        for s in skipped:
            out.warn(f"skipped {s['path']}: {s['reason']}")

    def render(d: dict[str, Any]) -> None:
        if found is not None:
            print(found.load_path)
        else:
            out.err.print("no valid checkpoint", markup=False)

    out.result(data, render)
    return EXIT_OK if found is not None else EXIT_INVALID


# -- seal -----------------------------------------------------------------
def cmd_seal(args: argparse.Namespace, out: Output) -> int:
    from ..sealing import seal

    checkpoint = seal(args.path, step=args.step, epoch=args.epoch, allow_unchecked=args.allow_unchecked)
    data = {"path": checkpoint.path, "load_path": checkpoint.load_path, "step": checkpoint.step,
            "epoch": checkpoint.epoch, "sequence": checkpoint.sequence, "files": len(checkpoint.manifest.files),
            "bytes": checkpoint.manifest.total_bytes, "manifest": os.path.join(checkpoint.path, MANIFEST_NAME)}
    out.result(data, lambda d: out.console.print(
        f"sealed {d['path']} (step {d['step']}, {d['files']} files, {human_bytes(d['bytes'])})", markup=False))
    return EXIT_OK
