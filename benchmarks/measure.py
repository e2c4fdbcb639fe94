"""Run a command; report its wall time and the peak RSS of its process tree's largest member.

    python benchmarks/measure.py -- ckptmgr export SRC -o OUT     -> prints one JSON line

Peak RSS is ``ru_maxrss`` of the waited-for children (the largest one), which is what
``/usr/bin/time -v`` reports as "Maximum resident set size".
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def measure(cmd: list[str], **kwargs) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"cmd": cmd, "returncode": proc.returncode, "seconds": round(seconds, 3),
            "peak_rss_bytes": peak_kib * 1024, "stdout": proc.stdout[-4000:], "stderr": proc.stderr[-4000:]}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    result = measure(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("stdout", "stderr")}))
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    sys.exit(result["returncode"])
