"""The verify benchmark (section 2 of benchmarks/run.py) on another host, raw results as JSON.

    python benchmarks/gpu/verify_host.py --out $OUT [--sizes-mb 1024 10240] [--reps 5]

`ckptmgr verify` end to end (process start included) against `cat FILES > /dev/null` of the same
files, warm and cold cache, interleaved; the CPU-only suite runs the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run import bench_verify  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1024, 10240])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="ckptmgr-verify-")
    try:
        rows = bench_verify(work, [mb * 1024 * 1024 for mb in args.sizes_mb], args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"host": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
              "reps": args.reps, "verify": rows}
    with open(os.path.join(args.out, "verify_host.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
