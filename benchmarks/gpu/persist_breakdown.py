"""Where a persist's time goes, against a raw write + fsync of the same bytes (CPU state, same disk).

    python benchmarks/gpu/persist_breakdown.py --out $OUT [--gb 12] [--reps 2]

Interleaved per repetition: raw write + fsync (one thread, sequential), ckptmgr's payload writer into
one file + fsync (several thread counts), and CheckpointManager.save (keep_last=1, so each save also
deletes the previous one, as raw's O_TRUNC drops the previous file). Manager saves report the phases
from their manifest (write, hash, stage) and the rest (publish, alias, retention).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from ckptmgr import CheckpointManager, payload  # noqa: E402
from ckptmgr.storage import LocalStorage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--work", default="/tmp/ckptmgr-persist")
    parser.add_argument("--gb", type=float, default=12.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    per = 256 * 1024 * 1024 // 4
    state = {f"t{i}": torch.empty(per).fill_(i) for i in range(max(1, int(args.gb * 1e9 / (per * 4))))}
    nbytes = sum(t.numel() * 4 for t in state.values())
    manager = CheckpointManager(os.path.join(args.work, "run"), keep_last=1).open()
    step = [0]

    def raw() -> dict:
        t0 = time.perf_counter()
        with open(os.path.join(args.work, "raw.bin"), "wb", buffering=0) as f:
            for t in state.values():
                f.write(memoryview(t.view(torch.uint8).numpy()))
            t1 = time.perf_counter()
            os.fsync(f.fileno())
        t2 = time.perf_counter()
        return {"total": t2 - t0, "write": t1 - t0, "fsync": t2 - t1}

    def layout(workers: int):
        def run() -> dict:
            path = os.path.join(args.work, f"layout-{workers}.pt")
            if os.path.exists(path):
                os.unlink(path)
            storage = LocalStorage()
            t0 = time.perf_counter()
            with storage.open_write(path) as f:
                payload.save(storage, f, state, workers=workers)
                t1 = time.perf_counter()
                storage.fsync(f)
            t2 = time.perf_counter()
            os.unlink(path)  # the disk holds one state at a time
            return {"total": t2 - t0, "write": t1 - t0, "fsync": t2 - t1}
        return run

    def managed() -> dict:
        step[0] += 1
        t0 = time.perf_counter()
        checkpoint = manager.save(state, step=step[0])
        total = time.perf_counter() - t0
        timing = checkpoint.manifest.timing
        return {"total": total, "write+fsync": timing["write_seconds"], "hash_others": timing["hash_seconds"],
                "staged": timing["stage_seconds"], "publish+alias+retention": total - timing["stage_seconds"]}

    methods = {"raw_write": raw, **{f"payload_w{w}": layout(w) for w in args.workers}, "manager_save": managed}
    samples: dict[str, list[dict]] = {name: [] for name in methods}
    for _ in range(args.reps):
        for name, run in methods.items():
            samples[name].append(run())
            print(name, {k: round(v, 3) for k, v in samples[name][-1].items()}, flush=True)
    summary = {"state_bytes": nbytes, "reps": args.reps, "cores": os.cpu_count(),
               "methods": {name: {k: round(statistics.median(s[k] for s in runs), 3) for k in runs[0]}
                           for name, runs in samples.items()}}
    raw_total = summary["methods"]["raw_write"]["total"]
    summary["throughput_vs_raw"] = {name: round(raw_total / m["total"], 3) for name, m in summary["methods"].items()}
    with open(os.path.join(args.out, "persist_breakdown.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
