"""Training stall per checkpoint of a ~1B-parameter model with AdamW state (~12 GB), on one GPU.

Methods, interleaved per repetition (median reported):
  torch_save_sync   torch.save(state) + fsync                          stall = everything
  ckptmgr_sync      CheckpointManager.save(state)                       stall = everything
  ckptmgr_async     AsyncCheckpointer.save(state)                       stall = snapshot into reused pinned buffers
  dcp_async         torch.distributed.checkpoint.async_save             stall = until it returns
  lightning_async   Lightning's AsyncCheckpointIO.save_checkpoint       stall = until it returns
and the bounds: a copy into preallocated pinned buffers (what an async save cannot beat) and a raw
write + fsync of the same bytes into a new file (what persisting cannot beat).

Outputs of earlier methods are deleted before each method, outside its timing, followed by a
sync: on this disk (ext4 mounted with `discard`) deleting 12 GB costs seconds, and whoever paid
for it would look slower. Managed saves keep every checkpoint (no retention inside the timing);
"total" is until the checkpoint is committed and durable.

    python benchmarks/gpu/async_stall.py --out $OUT [--params 1.0e9] [--reps 5] [--deadline 480]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ckptmgr.snapshot import iter_tensors  # noqa: E402


def build_state(params: float, device: str) -> tuple[dict, int]:
    width = 6144
    layers = max(1, round(params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device=device)).sum().backward()
    optimizer.step()  # materialise exp_avg / exp_avg_sq
    optimizer.zero_grad(set_to_none=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    nbytes = sum(t.numel() * t.element_size() for t in iter_tensors(state))
    return state, nbytes


def fsync_tree(path: str) -> None:
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


class Methods:
    def __init__(self, state: dict, work: str):
        from ckptmgr import CheckpointManager
        from ckptmgr.async_save import AsyncCheckpointer

        self.state, self.work = state, work
        self.manager = CheckpointManager(os.path.join(work, "managed"), keep_last=None).open()
        self.saver = AsyncCheckpointer(CheckpointManager(os.path.join(work, "managed-async"), keep_last=None).open())
        self.step = 0
        pin = torch.cuda.is_available()
        self.pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in iter_tensors(state)]

    def torch_save_sync(self) -> tuple[float, float]:
        path = os.path.join(self.work, "plain.pt")
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        stall = time.perf_counter() - t0
        return stall, stall

    def clear(self) -> None:
        """Delete every method's output (outside any timing) and let the disk settle."""
        for manager in (self.manager, self.saver.manager):
            for candidate in manager.checkpoints(quick=True):
                if candidate.form != "alias":
                    manager.delete(candidate.name, force=True)
        for name in os.listdir(self.work):
            path = os.path.join(self.work, name)
            if name.startswith("dcp-"):
                shutil.rmtree(path)
            elif os.path.isfile(path):
                os.unlink(path)
        os.sync()

    def ckptmgr_sync(self) -> tuple[float, float]:
        self.step += 1
        t0 = time.perf_counter()
        self.manager.save(self.state, step=self.step)
        stall = time.perf_counter() - t0
        return stall, stall

    def ckptmgr_async(self) -> tuple[float, float]:
        self.step += 1
        t0 = time.perf_counter()
        self.saver.save(self.state, step=self.step)
        stall = time.perf_counter() - t0
        self.saver.wait()
        return stall, time.perf_counter() - t0

    def dcp_async(self) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(self.work, f"dcp-{self.step}")
        t0 = time.perf_counter()
        future = dcp.async_save(self.state, checkpoint_id=path)
        stall = time.perf_counter() - t0
        future.result()
        fsync_tree(path)
        return stall, time.perf_counter() - t0

    def lightning_async(self) -> tuple[float, float]:
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        io = AsyncCheckpointIO(TorchCheckpointIO())
        path = os.path.join(self.work, "lightning.ckpt")
        t0 = time.perf_counter()
        io.save_checkpoint(self.state, path)
        stall = time.perf_counter() - t0
        io.teardown()  # waits for the background write
        fsync_tree(os.path.dirname(path)) if os.path.isdir(path) else _fsync(path)
        return stall, time.perf_counter() - t0

    def pinned_copy(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        for buffer, tensor in zip(self.pinned, iter_tensors(self.state), strict=True):
            buffer.copy_(tensor, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stall = time.perf_counter() - t0
        return stall, stall

    def raw_write(self) -> tuple[float, float]:
        path = os.path.join(self.work, "raw.bin")
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            for buffer in self.pinned:
                f.write(memoryview(buffer.reshape(-1).view(torch.uint8).numpy()))
            os.fsync(f.fileno())
        total = time.perf_counter() - t0
        return total, total


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--work", default="/tmp/ckptmgr-stall")
    parser.add_argument("--params", type=float, default=1.0e9)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=480.0, help="stop repeating after this many seconds")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods (default: all)")
    args = parser.parse_args()
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import torch.distributed as dist

    if not dist.is_initialized():  # DCP's async save wants a (here single-rank) process group
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    state, nbytes = build_state(args.params, device)
    methods = Methods(state, args.work)
    names = ["pinned_copy", "ckptmgr_async", "torch_save_sync", "ckptmgr_sync", "dcp_async", "lightning_async",
             "raw_write"]
    names = [n for n in names if args.methods is None or n in args.methods]
    methods.ckptmgr_async()  # first save allocates the pinned snapshot buffers; steady state is what trains
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    reps = 0
    for _ in range(args.reps):
        if reps and time.monotonic() - started > args.deadline:
            break
        for name in names:
            if name in errors:
                continue
            try:
                methods.clear()
                results[name].append(getattr(methods, name)())
            except Exception as exc:  # a peer's API failing must not lose the other measurements
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
        reps += 1
    gb = nbytes / 1e9
    summary = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "state_bytes": nbytes,
               "repetitions": reps, "torch": torch.__version__, "methods": {}}
    summary["errors"] = errors
    for name, samples in results.items():
        if not samples:
            continue
        stall = statistics.median(s for s, _ in samples)
        total = statistics.median(t for _, t in samples)
        summary["methods"][name] = {"stall_s": round(stall, 4), "total_s": round(total, 3),
                                    "stall_ms_per_gb": round(1000 * stall / gb, 2),
                                    "samples": [[round(s, 4), round(t, 3)] for s, t in samples]}
    m = summary["methods"]
    summary["ratios"] = {k: v for k, v in _ratios(m, gb).items() if v is not None}
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    with open(os.path.join(args.out, "async_stall.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=1))
    shutil.rmtree(args.work, ignore_errors=True)
    sys.exit(0)


def _ratios(m: dict, gb: float) -> dict:
    def ratio(a: str, b: str, f=lambda x, y: x / y) -> float | None:
        return round(f(m[a], m[b]), 3) if a in m and b in m else None

    return {
        "async_stall_vs_pinned_copy": ratio("ckptmgr_async", "pinned_copy", lambda x, y: x["stall_s"] / y["stall_s"]),
        "dcp_stall_vs_ours": ratio("dcp_async", "ckptmgr_async", lambda x, y: x["stall_s"] / y["stall_s"]),
        "torch_save_stall_vs_ours": ratio("torch_save_sync", "ckptmgr_async",
                                          lambda x, y: x["stall_s"] / y["stall_s"]),
        "persist_throughput_vs_raw": ratio("raw_write", "ckptmgr_async",
                                           lambda r, a: r["total_s"] / (a["total_s"] - a["stall_s"])),
        "sync_save_vs_torch_save": ratio("ckptmgr_sync", "torch_save_sync", lambda x, y: x["stall_s"] / y["stall_s"]),
        "target_stall_s": round(0.025 * gb + 0.05, 3),
    }


if __name__ == "__main__":
    main()
