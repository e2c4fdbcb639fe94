"""``ckptmgr walk | estimate | timeline``: what is on the storage, and how the run is going.

Each command imports what it needs when it runs, so the other commands start fast.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import catalog
from ..errors import UsageError
from .output import Output, human_age, human_bytes


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("walk", parents=[common], help="find and check every run and checkpoint under a root",
                       description="Walk a volume or directory tree: every run directory and checkpoint (managed "
                                   "and legacy), classified valid / corrupt / incomplete / legacy, plus crash "
                                   "leftovers, dangling `last` aliases and quarantined checkpoints; per run what "
                                   "resume would pick, size, count and age of the last commit. Never modifies "
                                   "anything, never unpickles. Exit 0: all valid; 1: something is wrong.")
    p.add_argument("root")
    p.add_argument("--quick", action="store_true", help="manifests and sizes only, no hashing")
    p.set_defaults(func=cmd_walk)

    p = sub.add_parser("estimate", parents=[common], help="time per step and invocations still needed",
                       description="From the run journal: seconds per step (saving included), steps per "
                                   "invocation under --time-limit, and how many invocations remain.")
    p.add_argument("run_dir")
    p.add_argument("--total-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--time-limit", default="23.5h", help="one invocation's budget (default 23.5h)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("timeline", parents=[common], help="draw a run: steps over time, saves, restarts, time lost",
                       description="Render the run journal as a PNG, SVG or HTML picture (needs matplotlib).")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", required=True, help="timeline.png, .svg or .html")
    p.set_defaults(func=cmd_timeline)


def cmd_walk(args: argparse.Namespace, out: Output) -> int:
    from ..walk import RunReport, estimated_bytes, find_runs, inspect_run

    runs, unreadable = find_runs(args.root)
    with out.progress("walking", 0 if args.quick else estimated_bytes(runs)) as advance:
        reports = [inspect_run(run, quick=args.quick, on_bytes=advance) for run in runs]
    reports += [RunReport(item["path"], error=item["reason"]) for item in unreadable]
    data = {"root": os.path.abspath(args.root), "mode": "quick" if args.quick else "full",
            "runs": [r.as_dict() for r in reports], "problems": sum(r.problems for r in reports)}
    data["all_valid"] = data["problems"] == 0
    out.result(data, lambda d: _render_walk(out, d))
    return 0 if data["all_valid"] else 1


def _render_walk(out: Output, data: dict[str, Any]) -> None:
    """One line per run, checkpoint, problem and leftover; every line whole (nothing cropped off a terminal)."""
    out.line(f"{data['root']} ({data['mode']} check)")
    for run in data["runs"]:
        if run["error"]:
            out.line(f"  {run['path']}: cannot be read: {run['error']}", style="red")
            continue
        out.line(f"  {run['path']}  {run['checkpoint_count']} checkpoints, {human_bytes(run['total_bytes'])}, "
                 f"last commit {human_age(run['last_commit_unix'])} ago, resume: {run['resume'] or 'nothing valid'}",
                 style="green" if run["problems"] == 0 else "red")
        for c in run["checkpoints"]:
            ok = c["status"] in ("valid", "legacy-ok", "legacy-unchecked", "alias")
            label = f"-> {c['alias_of']}" if c["status"] == "alias" else c["status"]
            step = c["step"] if c["step"] is not None else "-"
            out.line(f"    {label:>16}  {c['name']}  step {step}  {human_bytes(c['bytes'])}",
                     style="green" if ok else "red")
            for problem in c["problems"]:
                out.line(f"{'':>22}{problem}")
        for item in run["leftovers"]:
            out.line(f"    {item['kind']:>16}  {item['path']}", style="yellow")
    out.line(f"{len(data['runs'])} run(s), {data['problems']} problem(s)")


def cmd_estimate(args: argparse.Namespace, out: Output) -> int:
    from ..durations import parse_duration
    from ..history import estimate
    from ..journal import read_events

    if args.total_steps is None and args.epochs is not None and args.steps_per_epoch is not None:
        args.total_steps = args.epochs * args.steps_per_epoch
    elif args.total_steps is not None and (args.epochs is not None or args.steps_per_epoch is not None):
        raise UsageError(None, "give --total-steps, or --epochs with --steps-per-epoch, not both")
    limit = parse_duration(args.time_limit)
    found = catalog.resolve(args.run_dir, quick=True)
    result = estimate(read_events(args.run_dir), total_steps=args.total_steps, time_limit_s=limit,
                      current_step=found.step if found else None)
    data = vars(result)
    out.result(data, lambda d: _render_estimate(out, d))
    return 0 if result.seconds_per_step is not None else 1


def _render_estimate(out: Output, d: dict[str, Any]) -> None:
    p = out.console.print
    if d["seconds_per_step"] is None:
        p(f"{d['note']}; {d['invocations_so_far']} invocation(s) recorded", markup=False)
        return
    p(f"seconds per step:      {d['seconds_per_step']:.4f} (from {d['samples']} steps, saving included)")
    if d["save_seconds_mean"] is not None:
        p(f"mean save time:        {d['save_seconds_mean']:.2f} s")
    p(f"steps per invocation:  {d['steps_per_invocation']:,} within {d['time_limit_s'] / 3600:.2f} h")
    p(f"current step:          {d['current_step']}")
    if d["remaining_steps"] is not None:
        p(f"remaining:             {d['remaining_steps']:,} steps, {d['remaining_seconds'] / 3600:.2f} h, "
          f"{d['invocations_needed']} more invocation(s)")
    else:
        p("give --total-steps (or --epochs and --steps-per-epoch) for the time left")
    if d["note"]:
        p(f"note: {d['note']}", markup=False)


def cmd_timeline(args: argparse.Namespace, out: Output) -> int:
    from ..timeline import render

    data = render(args.run_dir, args.output)
    out.result(data, lambda d: out.console.print(
        f"wrote {d['output']}: {d['invocations']} invocation(s), {d['saves']} saves, "
        f">= {d['lost_seconds']:.0f} s lost to interruptions", markup=False))
    return 0
