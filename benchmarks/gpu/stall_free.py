"""Stall-free checkpoints on a GPU, measured in a training loop, side by side in one run.

    python benchmarks/gpu/stall_free.py single --out $OUT       # 1.0 B params + AdamW (11.8 GB), one GPU
    python benchmarks/gpu/stall_free.py stall --out $OUT        # its first half: the stall per save
    python benchmarks/gpu/stall_free.py throughput --out $OUT   # its second half: throughput
    python benchmarks/gpu/stall_free.py deepspeed --out $OUT    # Lightning DeepSpeedStrategy ZeRO-2 and ZeRO-3

Stall is what a save costs the training loop: every step is timed (the training stream synchronised at
each step boundary, as `loss.item()` would, so device-side waits count too), and a save's stall is the
time of the step interval that holds the save plus the next one (whose optimizer step may wait for the
copy), less two median steps without a save. Background work (persisting, hashing) runs during those
steps and its interference is counted as well.

single: methods, interleaved per repetition:
  overlapped    AsyncCheckpointer (copy on a side stream, overlapping the next forward/backward)
  today         AsyncCheckpointer(overlap=False) (the copy blocks the step)
  pinned_copy   a copy into preallocated pinned buffers, synchronised (the bound "today" cannot beat)
  dcp_async     torch.distributed.checkpoint.async_save (single process)
  torch_save    torch.save + fsync
then training throughput with a save every N steps (N = 10 and 50) against no checkpointing: windows of
the same number of steps in a mirrored order (none, 10, 50, 10, none), every step's time recorded.

deepspeed: for each stage, one Trainer per method (Lightning's ModelCheckpoint, ManagedCheckpoint sync,
ManagedCheckpoint async), saving every --every steps; and the time to copy that rank's shards (the state
dicts DeepSpeed's checkpoint engine is given) into preallocated pinned buffers. Then `ckptmgr export` of the
newest async checkpoint against DeepSpeed's zero_to_fp32 (bitwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- single GPU, 1.0 B parameters ---------------------------------------------------------------------------
class Loop:
    """A ~1 B-parameter MLP with AdamW, stepped and timed one step at a time."""

    def __init__(self, params: float, width: int, batch: int):
        layers = max(1, round(params / (width * width)))
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).cuda()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6, foreach=True)
        self.input = torch.randn(batch, width, device="cuda")
        self.batch, self.width, self.layers = batch, width, layers
        self.step()

    def step(self) -> None:
        self.model(self.input).pow(2).mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def timed_steps(self, n: int, save_at: dict[int, object] | None = None) -> list[float]:
        """Durations of n step intervals; ``save_at[i]()`` runs at the end of interval i (inside it)."""
        durations = []
        stream = torch.cuda.current_stream()
        stream.synchronize()
        for i in range(n):
            started = time.perf_counter()
            self.step()
            if save_at and i in save_at:
                save_at[i]()
            # The training stream only, as loss.item() would: a device-wide synchronize would also wait for
            # the snapshot's side stream and charge its copy to the step it overlaps.
            stream.synchronize()
            durations.append(time.perf_counter() - started)
        return durations


def single(args: argparse.Namespace) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from ckptmgr import CheckpointManager
    from ckptmgr.async_save import AsyncCheckpointer
    from ckptmgr.snapshot import iter_tensors

    if not dist.is_initialized():  # DCP's async_save wants a process group (one rank)
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29571", rank=0, world_size=1)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    loop = Loop(args.params, args.width, args.batch)
    state_bytes = sum(t.numel() * t.element_size() for t in iter_tensors(loop.state()))
    overlapped = AsyncCheckpointer(CheckpointManager(f"{work}/overlapped", keep_last=1).open())
    today = AsyncCheckpointer(CheckpointManager(f"{work}/today", keep_last=1).open(), overlap=False)
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in iter_tensors(loop.state())]
    step_counter = [0]

    def save_overlapped() -> None:
        step_counter[0] += 1
        overlapped.save(loop.state(), step=step_counter[0])

    def save_today() -> None:
        step_counter[0] += 1
        today.save(loop.state(), step=step_counter[0])

    def save_pinned() -> None:
        for buffer, tensor in zip(pinned, iter_tensors(loop.state()), strict=True):
            buffer.copy_(tensor, non_blocking=True)
        torch.cuda.synchronize()

    dcp_futures: list = []

    def save_dcp() -> None:
        path = f"{work}/dcp-{len(dcp_futures)}"
        dcp_futures.append((path, dcp.async_save(loop.state(), checkpoint_id=path)))

    def save_torch() -> None:
        with open(f"{work}/plain.pt", "wb") as f:
            torch.save(loop.state(), f)
            f.flush()
            os.fsync(f.fileno())

    def settle() -> None:
        """Between measurements: finish background work, drop outputs, let the disk settle (untimed)."""
        overlapped.wait()
        today.wait()
        for path, future in dcp_futures:
            future.result()
            shutil.rmtree(path, ignore_errors=True)
        dcp_futures.clear()
        if os.path.exists(f"{work}/plain.pt"):
            os.unlink(f"{work}/plain.pt")
        os.sync()

    methods = {"overlapped": save_overlapped, "today": save_today, "pinned_copy": save_pinned,
               "dcp_async": save_dcp, "torch_save": save_torch}
    save_overlapped(), save_today(), settle()  # allocate the pinned buffers once, as a run does
    baseline = loop.timed_steps(args.base_steps)
    print(f"[setup] {state_bytes / 1e9:.2f} GB of state, step {median(baseline):.3f} s", flush=True)
    report: dict = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "state_bytes": state_bytes,
        "model": {"layers": loop.layers, "width": loop.width, "batch_rows": loop.batch, "dtype": "float32",
                  "tf32": torch.backends.cuda.matmul.allow_tf32},
        "step_seconds_median": median(baseline),
    }
    if args.part in ("single", "stall"):
        report.update(stall_per_save(loop, methods, overlapped, settle, baseline, args))
        write(args, "stall_free_single.json", report)  # kept if the throughput part runs out of time
    if args.part in ("single", "throughput"):
        report["throughput"] = throughput(loop, overlapped, args, settle, report)
    overlapped.close()
    today.close()
    return report


def stall_per_save(loop: Loop, methods: dict, overlapped, settle, baseline: list[float],
                   args: argparse.Namespace) -> dict:
    """Every method's stall, the methods interleaved in each repetition."""
    stalls: dict[str, list[float]] = {name: [] for name in methods}
    waits: dict[str, list[float]] = {"overlapped_issue": [], "overlapped_wait": []}
    started = time.monotonic()
    for _ in range(args.reps):
        if stalls["overlapped"] and time.monotonic() - started > args.deadline:
            break
        for name, save in methods.items():
            durations = loop.timed_steps(3, save_at={0: save})
            stalls[name].append(durations[0] + durations[1] - 2 * median(baseline))
            if name == "overlapped":
                snapshot = overlapped.snapshots[-1]
                waits["overlapped_issue"].append(snapshot.issue_seconds)
                waits["overlapped_wait"].append(snapshot.wait_seconds)
            settle()
            print(f"[stall] {name}: {stalls[name][-1]:.3f} s", flush=True)
    bound = median(stalls["pinned_copy"])
    return {"stall_seconds": {name: {"median": median(v), "all": v} for name, v in stalls.items()},
            "overlapped_host_seconds": {k: median(v) for k, v in waits.items()},
            "ratios_to_pinned_copy": {name: median(v) / bound for name, v in stalls.items()}}


def throughput(loop: Loop, saver, args: argparse.Namespace, settle, report: dict) -> dict:
    """Steps per second with a save every N steps against none, over windows of the same number of steps.

    The windows run in a mirrored order (none, N1, N2, ..., N1, none) so that a slow drift of the GPU's
    speed (clocks settle as it heats over minutes) weighs on every configuration alike. A window saves at
    steps 0, N, 2N, ...: each save's persist runs beside the steps of the window (N steps take longer than a
    persist); the time a persist still needs when the window ends is recorded, not hidden.
    """
    counter = [10**6]
    call_seconds: list[float] = []

    def save() -> None:
        counter[0] += 1
        started = time.perf_counter()
        saver.save(loop.state(), step=counter[0])  # waits first for the previous save's persist, if running
        call_seconds.append(time.perf_counter() - started)

    configs: list[int | None] = [None, *args.every]
    order = configs + configs[-2::-1]
    windows: dict[str, list[dict]] = {}
    result: dict = {"order": ["none" if every is None else f"every_{every}" for every in order], "windows": windows}
    for every in order:
        settle()
        torch.cuda.synchronize()
        call_seconds.clear()
        save_at = {i: save for i in range(args.throughput_steps) if every and i % every == 0}
        started = time.perf_counter()
        durations = loop.timed_steps(args.throughput_steps, save_at=save_at)
        elapsed = time.perf_counter() - started
        waited = time.perf_counter()
        saver.wait()
        key = "none" if every is None else f"every_{every}"
        windows.setdefault(key, []).append({
            "steps": args.throughput_steps, "saves": len(save_at), "seconds": elapsed,
            "persist_left_at_end_seconds": time.perf_counter() - waited,
            "save_call_seconds": list(call_seconds), "persist_seconds": saver.persist_seconds[-len(save_at):]
            if save_at else [], "step_seconds": durations})
        print(f"[throughput] {key}: {args.throughput_steps / elapsed:.4f} steps/s", flush=True)
        write(args, "stall_free_throughput.json", {**report, "throughput": result})
    for key, runs in windows.items():
        steps, seconds = sum(r["steps"] for r in runs), sum(r["seconds"] for r in runs)
        result[key] = {"windows": len(runs), "steps": steps, "saves": sum(r["saves"] for r in runs),
                       "seconds": seconds, "steps_per_second": steps / seconds}
    base = result["none"]
    for key in windows:
        value = result[key]
        value["ratio_to_none"] = value["steps_per_second"] / base["steps_per_second"]
        if value["saves"]:  # time lost per save against the same steps without saving
            value["seconds_lost_per_save"] = (value["seconds"] - base["seconds"] * value["steps"] / base["steps"]) \
                / value["saves"]
    return result


# -- Lightning DeepSpeedStrategy ----------------------------------------------------------------------------
def deepspeed(args: argparse.Namespace) -> dict:
    report: dict = {"device": torch.cuda.get_device_name(), "devices": args.devices, "stages": {}}
    for stage in args.stages:
        per_stage: dict = {}
        for method in ("lightning", "managed_sync", "managed_async"):
            cmd = [sys.executable, __file__, "ds-one", "--stage", str(stage), "--method", method,
                   "--work", args.work, "--ds-every", str(args.ds_every), "--ds-steps", str(args.ds_steps),
                   "--ds-width", str(args.ds_width), "--ds-layers", str(args.ds_layers),
                   "--ds-batch", str(args.ds_batch), "--devices", str(args.devices)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            with open(os.path.join(args.out, f"ds_stage{stage}_{method}.log"), "w") as f:
                f.write(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            per_stage[method] = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-2000:]}
        lightning = per_stage["lightning"].get("stall_per_save_event")
        ours = per_stage["managed_async"].get("stall_per_save_event")
        bound = per_stage["managed_async"].get("pinned_copy_seconds")
        sync = per_stage["managed_sync"].get("stall_per_save_event")
        if lightning and ours and bound and sync:
            per_stage["ratios"] = {"async_to_pinned_copy": ours / bound, "lightning_to_async": lightning / ours,
                                   "sync_to_async": sync / ours}
        per_stage["export"] = export_parity(args, stage)
        report["stages"][str(stage)] = per_stage
        write(args, "stall_free_deepspeed.json", report)
        print(f"[deepspeed] stage {stage}: {json.dumps(per_stage.get('ratios'))}", flush=True)
    return report


def ds_one(args: argparse.Namespace) -> None:
    """One Trainer (a subprocess per method): per-step times around each save, and the copy bound."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from ckptmgr.lightning import ManagedCheckpoint

    width, layers, batch = args.ds_width, args.ds_layers, args.ds_batch

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

        def training_step(self, unused, batch_idx):
            if not hasattr(self, "data"):  # the batch lives on the GPU: no host-to-device copy in the timing
                self.data = torch.randn(batch, width, device=self.device, dtype=next(self.parameters()).dtype)
            return self.net(self.data).float().pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-6)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_Repeat(torch.zeros(1), args.ds_steps), batch_size=None)

    class StepTimes(pl.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, *rest):
            torch.cuda.current_stream().synchronize()  # the training stream (see Loop.timed_steps)
            self.times.append(time.perf_counter())

    run = os.path.join(args.work, f"ds{args.stage}-{args.method}")
    shutil.rmtree(run, ignore_errors=True)
    if args.method == "lightning":
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=run, every_n_train_steps=args.every, save_top_k=1)
    else:
        checkpoint = ManagedCheckpoint(dirpath=run, every_n_train_steps=args.every, save_top_k=1,
                                       async_save=args.method == "managed_async")
    timer = StepTimes()

    strategy = DeepSpeedStrategy(stage=args.stage, logging_batch_size_per_gpu=batch)
    trainer = pl.Trainer(accelerator="gpu", devices=args.devices, strategy=strategy, precision="bf16-mixed",
                         max_steps=args.ds_steps, callbacks=[timer, checkpoint], logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)
    trainer.fit(Model())
    torch.cuda.synchronize()
    times = timer.times + [time.perf_counter()]
    # Interval i: batch i (global step i+1) and the saves after it.
    intervals = [b - a for a, b in zip(times, times[1:], strict=False)]
    save_intervals = {i for i in range(len(intervals)) if (i + 1) % args.every == 0}
    plain = [d for i, d in enumerate(intervals) if i not in save_intervals and i - 1 not in save_intervals and i > 2]
    step = median(plain)
    stalls = [intervals[i] + intervals[i + 1] - 2 * step for i in sorted(save_intervals) if i + 1 < len(intervals)]
    # The first save allocates the pinned buffers (async) and warms the page cache: reported, not in the median.
    result = {"stage": args.stage, "method": args.method, "step_seconds_median": step, "stalls": stalls,
              "first_save_stall": stalls[0] if stalls else None,
              "stall_per_save_event": median(stalls[1:] or stalls), "save_events": len(stalls),
              "checkpoint_bytes": _du(run)}
    if args.method == "managed_async":
        result["pinned_copy_seconds"] = pinned_copy_of_shards(trainer.strategy.deepspeed_engine, args.work)
    if trainer.is_global_zero:
        print("RESULT " + json.dumps(result), flush=True)


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, tensor: torch.Tensor, n: int):
        self.tensor, self.n = tensor, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tensor


def pinned_copy_of_shards(engine, work: str) -> float:
    """Seconds to copy the state dicts this rank's checkpoint engine is given into preallocated pinned
    buffers (the second of two copies; the first allocates)."""
    from ckptmgr.snapshot import SnapshotBuffers

    class Recorder:
        def __init__(self, inner):
            self.inner, self.states = inner, []

        def save(self, state_dict, path):
            self.states.append(state_dict)

        def commit(self, info):
            return True

        def __getattr__(self, name):
            return getattr(self.inner, name)

    inner = engine.checkpoint_engine
    recorder = engine.checkpoint_engine = Recorder(inner)
    try:
        engine.save_checkpoint(os.path.join(work, "bound"), tag="checkpoint")
    finally:
        engine.checkpoint_engine = inner
    buffers = SnapshotBuffers(guard=False)
    buffers.snapshot(recorder.states)
    torch.cuda.synchronize()
    started = time.perf_counter()
    buffers.snapshot(recorder.states)
    return time.perf_counter() - started


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def export_parity(args: argparse.Namespace, stage: int) -> dict:
    from ckptmgr.catalog import resolve

    run = os.path.join(args.work, f"ds{stage}-managed_async")
    found = resolve(run)
    if found is None:
        return {"error": "no checkpoint"}
    out = os.path.join(args.work, f"export{stage}")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckptmgr", "export", found.path, "-o", out, "--strip-prefix",
                           "_forward_module.", "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ours = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            ours.update(load_file(os.path.join(out, name)))
    reference = {k.removeprefix("_forward_module."): v
                 for k, v in get_fp32_state_dict_from_zero_checkpoint(found.path).items()}
    equal = sum(torch.equal(ours[k], v.contiguous()) for k, v in reference.items() if k in ours)
    verify = subprocess.run([sys.executable, "-m", "ckptmgr", "verify", run, "--json"], capture_output=True,
                            text=True)
    return {"checkpoint": found.name, "export_seconds": seconds, "tensors": len(reference), "bitwise_equal": equal,
            "all_equal": equal == len(reference) == len(ours), "verify_exit": verify.returncode}


def write(args: argparse.Namespace, name: str, report: dict) -> None:
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(report, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["single", "stall", "throughput", "deepspeed", "ds-one"])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--work", default="/tmp/ckptmgr-stall-free")
    parser.add_argument("--params", type=float, default=1.0e9)
    parser.add_argument("--width", type=int, default=6144)
    parser.add_argument("--batch", type=int, default=10240, help="rows per step of the 1 B model")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=240.0)
    parser.add_argument("--base-steps", type=int, default=8)
    parser.add_argument("--every", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--throughput-steps", type=int, default=60)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--method", default="managed_async")
    parser.add_argument("--devices", type=int, default=1)
    # Saves further apart than a persist of the shards takes (5.6 GB: ~5 s on the H200 host), else the
    # next save waits for the previous one (one save in flight) and that wait is counted as stall.
    parser.add_argument("--ds-every", type=int, default=60)
    parser.add_argument("--ds-steps", type=int, default=190)
    parser.add_argument("--ds-width", type=int, default=4096)
    parser.add_argument("--ds-layers", type=int, default=24)
    parser.add_argument("--ds-batch", type=int, default=32768)
    args = parser.parse_args()
    if args.part == "ds-one":
        args.every = args.ds_every
        ds_one(args)
        return
    os.makedirs(args.out, exist_ok=True)
    report = deepspeed(args) if args.part == "deepspeed" else single(args)
    names = {"single": "stall_free_single.json", "stall": "stall_free_single.json",
             "throughput": "stall_free_throughput.json", "deepspeed": "stall_free_deepspeed.json"}
    write(args, names[args.part], report)
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
