"""``ckptmgr verify | list | resolve | seal``: the store's commands.

verify, list and resolve only read: they never modify anything, never
unpickle, and never import torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import catalog
from ..aliases import read_support
from ..errors import NotACheckpointError, PathNotFoundError
from ..records import read_records
from ..verify import Status, VerifyResult, has_manifest, path_size, records_for, sharded_layout, verify_checkpoint
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
                       description="Check a legacy checkpoint (zip CRC32s; for DeepSpeed, that `latest` names a "
                                   "tag holding the model states), then publish its commit record in the run's "
                                   ".ckptmgr/: the file or directory stays where it is, byte for byte. Refuses "
                                   "corrupt checkpoints, symlinks and run directories.")
    p.add_argument("path")
    p.add_argument("--step", type=int, default=None, help="step, when the name has no step=N")
    p.add_argument("--epoch", type=int, default=None, help="epoch, when the name has no epoch=N")
    p.add_argument("--allow-unchecked", action="store_true", help="seal old pickle-format files that carry no CRC")
    p.set_defaults(func=cmd_seal)


# -- verify ---------------------------------------------------------------
def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    if not os.path.lexists(args.path):
        raise PathNotFoundError(args.path, "no such file or directory")
    with out.progress("verifying", 0 if args.quick else _bytes_to_hash(args.path)) as advance:
        if is_run_directory(args.path):
            results = _verify_run(args.path, args.quick, args.workers, advance)
        else:
            results = [verify_checkpoint(args.path, quick=args.quick, workers=args.workers, on_bytes=advance)]
    data = {
        "path": os.path.abspath(args.path),
        "mode": "quick" if args.quick else "full",
        "all_valid": all(r.status.ok for r in results),
        "checkpoints": [_result_dict(r) for r in results],
    }
    out.result(data, lambda d: _render_verify(out, results))
    return EXIT_OK if data["all_valid"] else EXIT_INVALID


def _bytes_to_hash(path: str) -> int:
    return path_size(path)


def _verify_run(run_dir: str, quick: bool, workers: int | None, on_bytes: Any) -> list[VerifyResult]:
    """Each candidate of a run directory (aliases excluded), classified as `list` and `walk` classify it."""
    results = []
    for c in catalog.scan(run_dir):
        if c.form == catalog.ALIAS:
            continue
        if not catalog.classify(run_dir, c, quick=quick, workers=workers, on_bytes=on_bytes):
            continue  # rotated away by a live writer while we verified the run
        results.append(c.result or VerifyResult(c.path, Status(c.status), list(c.problems)))
    if not results:
        raise NotACheckpointError(run_dir, "no checkpoints here (not a checkpoint, not a run directory)")
    return results


def is_run_directory(path: str) -> bool:
    """A directory that holds checkpoints, as opposed to a directory that is one."""
    if not os.path.isdir(path) or os.path.islink(path) or has_manifest(path) or sharded_layout(path):
        return False
    run_dir, name = os.path.split(os.path.abspath(path))
    return not records_for(name, read_records(run_dir))


def _result_dict(r: VerifyResult) -> dict[str, Any]:
    m = r.manifest
    return {
        "path": r.path,
        "name": os.path.basename(r.path),
        "status": r.status.value,
        "valid": r.status.ok,
        "problems": r.problems,
        "notes": r.notes,
        "extra_files": r.extra_files,
        "format_version": m.format_version if m else None,
        "step": m.step if m else None,
        "epoch": m.epoch if m else None,
        "sequence": m.sequence if m else None,
        "bytes": m.total_bytes if m else None,
        "files": len(m.files) if m else None,
        "bytes_hashed": r.bytes_hashed,
        "record": r.record.path if r.record else None,
    }


def _render_verify(out: Output, results: list[VerifyResult]) -> None:
    for r in results:
        out.line(f"{r.status.value:>16}  {r.path}", style="green" if r.status.ok else "red")
        for problem in r.problems:
            out.line(f"{'':>18}{problem}")
        for note in r.notes:
            out.line(f"{'':>18}note: {note}")
        for extra in r.extra_files:
            out.line(f"{'':>18}note: {extra}: not listed in the manifest")
    bad = sum(not r.status.ok for r in results)
    out.line(f"{len(results)} checked, {bad} invalid")


# -- list -----------------------------------------------------------------
def list_rows(run_dir: str, *, quick: bool) -> tuple[list[dict[str, Any]], str | None]:
    """One row per candidate (newest first) and the name resume would pick (the one classifier: catalog.inspect)."""
    candidates, pick = catalog.inspect(run_dir, quick=quick)
    support = read_support(run_dir)
    rows = []
    for c in candidates:
        m = c.verified_manifest or c.manifest
        rows.append({"name": c.name, "path": c.path, "step": c.step, "epoch": c.epoch,
                     "sequence": m.sequence if m else None,
                     "bytes": m.total_bytes if m else (None if c.form == catalog.ALIAS else path_size(c.path)),
                     "created_unix": m.created_unix if m else None, "status": c.status, "problems": c.problems,
                     "alias_of": c.alias_of or (m.alias_of if m else None), "alias": _alias_kind(c, support),
                     "format_version": m.format_version if m else None, "resume": c is pick})
    return rows, pick.name if pick is not None else None


def _alias_kind(c: catalog.Candidate, support: Any) -> str | None:
    """How an alias is held here: a symlink, a hard link, or a full copy (where links are not supported)."""
    if c.form == catalog.ALIAS:
        return "symlink"
    m = c.verified_manifest or c.manifest
    if m is None or m.alias_of is None:
        return None
    try:
        links = os.lstat(c.path).st_nlink if m.is_file else 2
    except OSError:
        return None
    return "hardlink" if links > 1 else "full-copy"


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    rows, pick = list_rows(args.run_dir, quick=args.quick)
    data = {"run_dir": os.path.abspath(args.run_dir), "resume": pick, "checkpoints": rows}
    out.result(data, lambda d: _render_list(out, rows, pick))
    return EXIT_OK if pick is not None else EXIT_INVALID


def _render_list(out: Output, rows: list[dict[str, Any]], pick: str | None) -> None:
    columns = ("", "name", "step", "epoch", "seq", "size", "age", "status")
    table = []
    for row in rows:
        status = row["status"]
        if row["alias_of"]:
            status = f"{status}, {row['alias'] or 'alias'} of {row['alias_of']}" if status != "alias" else \
                f"symlink -> {row['alias_of']}"
        table.append(("*" if row["resume"] else "", row["name"], _dash(row["step"]), _dash(row["epoch"]),
                      _dash(row["sequence"]), human_bytes(row["bytes"]), human_age(row["created_unix"]), status))
    widths = [max([len(columns[i])] + [len(r[i]) for r in table]) for i in range(len(columns))]
    right = {2, 3, 4, 5}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                  strict=True)))

    out.line(fmt(columns).rstrip())
    for row, cells in zip(rows, table, strict=True):
        ok = row["status"] in ("valid", "legacy-ok", "legacy-unchecked", "alias")
        out.line(fmt(cells).rstrip(), style="green" if ok else "red")
    for row in rows:
        for problem in row["problems"]:
            out.line(f"  {row['name']}: {problem}")
    out.line(f"resume would pick: {pick or 'nothing (no valid checkpoint)'}")


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
            out.line(found.load_path)
        else:
            sys.stderr.write("no valid checkpoint\n")

    out.result(data, render)
    return EXIT_OK if found is not None else EXIT_INVALID


# -- seal -----------------------------------------------------------------
def cmd_seal(args: argparse.Namespace, out: Output) -> int:
    from ..sealing import seal

    checkpoint = seal(args.path, step=args.step, epoch=args.epoch, allow_unchecked=args.allow_unchecked)
    data = {"path": checkpoint.path, "load_path": checkpoint.load_path, "step": checkpoint.step,
            "epoch": checkpoint.epoch, "sequence": checkpoint.sequence, "files": len(checkpoint.manifest.files),
            "bytes": checkpoint.manifest.total_bytes}
    out.result(data, lambda d: out.line(
        f"sealed {d['path']} (step {d['step']}, {d['files']} file(s), {human_bytes(d['bytes'])}); "
        "the payload was not moved"))
    return EXIT_OK
