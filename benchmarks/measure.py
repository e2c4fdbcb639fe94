"""Run a command; report its wall time and the peak RSS of its process tree's largest member.

    python benchmarks/measure.py -- ckptmgr export SRC -o OUT     -> prints one JSON line

Peak RSS is ``ru_maxrss`` of that one child, from ``os.wait4`` (what ``/usr/bin/time -v`` reports as
"Maximum resident set size"); ``RUSAGE_CHILDREN`` would report the largest of every child ever waited for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def measure(cmd: list[str], **kwargs) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **kwargs)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {"cmd": cmd, "returncode": proc.returncode, "seconds": round(seconds, 3),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": stdout[-4000:], "stderr": stderr[-4000:]}


def measure_isolated(cmd: list[str], **kwargs) -> dict:
    """``measure`` from a small intermediate process.

    Linux records a process's RSS high-water mark at exec, and a forked child starts with its
    parent's: measured straight from a large process (a benchmark holding gigabytes), every child
    would report at least the parent's RSS. The intermediate is small, so its child's figure is its own.
    """
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--", *cmd], capture_output=True, text=True,
                          **kwargs)
    first, _, rest = proc.stdout.partition("\n")
    result = json.loads(first)
    result.update(stdout=rest[-4000:], stderr=proc.stderr[-4000:])
    return result


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    result = measure(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("stdout", "stderr")}))
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    sys.exit(result["returncode"])
