"""A picture of a run: step against wall-clock time, across invocations (matplotlib, optional).

Each save is a mark (green: its checkpoint verifies; grey: rotated away; red:
corrupt or quarantined), each invocation start a vertical line, and the work
done after an invocation's last save, lost when it ended, a shaded band
(a lower bound for a killed invocation: the journal only knows its last event).
"""

from __future__ import annotations

import datetime as dt
import html
import io
import os
from typing import Any

from .catalog import check_run_dir
from .errors import NotACheckpointError, UsageError
from .history import invocations
from .journal import read_events
from .walk import inspect_run


def render(run_dir: str, out: str) -> dict[str, Any]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError(None, "timeline needs matplotlib", hint="pip install 'ckptmgr[plot]'") from exc
    if not out.endswith((".png", ".svg", ".html")):
        raise UsageError(out, "output must end in .png, .svg or .html")
    check_run_dir(run_dir)
    runs = invocations(read_events(run_dir))
    if not runs:
        raise NotACheckpointError(run_dir, "no run journal here (.ckptmgr/journal.jsonl): nothing to draw")
    status = {c.name: c.status for c in inspect_run(run_dir, quick=True).checkpoints}
    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    colours = {"valid": "tab:green", "missing": "tab:gray"}
    lost_total = 0.0
    for number, inv in enumerate(runs):
        start = _time(inv.started_unix)
        ax.axvline(start, color="tab:blue", alpha=0.4, linewidth=1)
        ax.annotate(f"#{number + 1}", (start, 0), xytext=(3, 3), textcoords="offset points", fontsize=8)
        if inv.saves:
            times = [_time(s["unix"]) for s in inv.saves]
            steps = [s["step"] for s in inv.saves]
            ax.plot(times, steps, color="tab:blue", linewidth=1)
            for t, s, save in zip(times, steps, inv.saves, strict=True):
                state = status.get(save.get("name"), "missing")
                ax.scatter([t], [s], s=18, zorder=3, color=colours.get(state, "tab:red"))
        lost = inv.lost_seconds
        lost_total += lost
        if lost > 0:
            last = inv.last_save["unix"] if inv.saves else inv.started_unix
            ax.axvspan(_time(last), _time(last + lost), color="tab:red", alpha=0.15)
    ax.set_xlabel("wall-clock time (UTC)")
    ax.set_ylabel("step")
    ax.set_title(f"{os.path.basename(run_dir.rstrip('/'))}: {len(runs)} invocation(s), "
                 f"{sum(len(i.saves) for i in runs)} saves, >= {lost_total / 60:.1f} min lost to interruptions")
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    if out.endswith(".html"):
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
        _write_html(out, run_dir, buffer.getvalue(), runs)
    else:
        fig.savefig(out)
    plt.close(fig)
    return {"output": os.path.abspath(out), "invocations": len(runs), "saves": sum(len(i.saves) for i in runs),
            "lost_seconds": round(lost_total, 3)}


def _time(unix: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix, tz=dt.timezone.utc)


def _write_html(out: str, run_dir: str, svg: str, runs: list) -> None:
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{_time(inv.started_unix):%Y-%m-%d %H:%M:%S}</td><td>{len(inv.saves)}</td>"
        f"<td>{inv.first_step if inv.first_step is not None else '-'}</td>"
        f"<td>{inv.last_save['step'] if inv.last_save else '-'}</td>"
        f"<td>{'yes' if inv.graceful else 'no (killed?)'}</td><td>{inv.lost_seconds:.0f}</td></tr>"
        for i, inv in enumerate(runs))
    page = (f"<!doctype html><meta charset='utf-8'><title>ckptmgr timeline: {html.escape(run_dir)}</title>"
            f"<h1>{html.escape(run_dir)}</h1>{svg}<table border=1 cellpadding=4><tr><th>#</th><th>started (UTC)"
            f"</th><th>saves</th><th>first step</th><th>last step</th><th>ended gracefully</th>"
            f"<th>seconds lost (at least)</th></tr>{rows}</table>")
    with open(out, "w") as f:
        f.write(page)
