"""The benchmark suite: ratios against the baselines, measured side by side in one run.

    python benchmarks/run.py                      # full size; writes docs/BENCHMARKS.md
    python benchmarks/run.py --smoke --output X   # tiny sizes, what CI runs to keep this working

Every figure is the median of interleaved repetitions (method A, method B, A, B, ...), so drift of
the machine hits both sides alike. The GPU tables come from benchmarks/results/*.json, written by
benchmarks/gpu/*.py on the GPU machine (docs/GPU.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import torch  # noqa: E402
from measure import measure_isolated  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.verify import verify_checkpoint  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def interleave(methods: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    """Median seconds of each method, run in turn ``reps`` times."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, run in methods.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}


def state_of(nbytes: int) -> dict:
    chunk = 64 * 1024 * 1024
    tensors = {f"layer{i}.weight": torch.randn(chunk // 4) for i in range(max(1, nbytes // chunk))}
    if nbytes < chunk:
        tensors = {"layer0.weight": torch.randn(max(1, nbytes // 4))}
    return {"state_dict": tensors, "step": 1}


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- 1. save ------------------------------------------------------------------
def bench_save(work: str, sizes: list[int], reps: int) -> list[dict]:
    rows = []
    for size in sizes:
        state = state_of(size)
        run_dir = os.path.join(work, f"save-{size}")
        # Each side deletes its previous output before its timing starts, then syncs: a deletion
        # inside one side's timing (retention, say) would charge it for the other's leftovers.
        manager = CheckpointManager(run_dir, keep_last=None).open()
        step = [0]

        def managed(manager=manager, state=state, step=step) -> float:
            for candidate in manager.checkpoints(quick=True):
                if candidate.form != "alias":
                    manager.delete(candidate.name, force=True)
            os.sync()
            step[0] += 1
            t0 = time.perf_counter()
            manager.save(state, step=step[0])
            return time.perf_counter() - t0

        def raw(state=state) -> float:
            path = os.path.join(work, "raw.pt")
            if os.path.exists(path):
                os.unlink(path)
            os.sync()
            t0 = time.perf_counter()
            torch.save(state, path)
            fsync_path(path)
            return time.perf_counter() - t0

        result = interleave({"managed": managed, "torch.save+fsync": raw}, reps)
        manager.close()
        shutil.rmtree(run_dir)
        rows.append({"size_bytes": size, **result, "ratio": result["managed"] / result["torch.save+fsync"]})
    return rows


# -- 2. verify ----------------------------------------------------------------
def bench_verify(work: str, sizes: list[int], reps: int) -> list[dict]:
    rows = []
    cold_ok = drop_caches()
    for size in sizes:
        run_dir = os.path.join(work, f"verify-{size}")
        with CheckpointManager(run_dir, keep_last=None) as manager, manager.stage(step=1) as staging:
            block = os.urandom(16 * 1024 * 1024)
            for index in range(max(1, size // (256 * 1024 * 1024))):  # 256 MB files, as DeepSpeed shards are
                with staging.open_file(f"shard{index}.bin") as f:
                    for _ in range(min(size, 256 * 1024 * 1024) // len(block)):
                        f.write(block)
        ckpt = os.path.join(run_dir, "step=1.ckpt")
        files = sorted(glob.glob(os.path.join(ckpt, "*.bin")))
        total = sum(os.path.getsize(f) for f in files)
        verify_cmd = [sys.executable, "-m", "ckptmgr", "verify", ckpt]
        cat_cmd = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files]

        def timed(cmd: list[str], cold: bool) -> Callable[[], float]:
            def run() -> float:
                if cold:
                    drop_caches()
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL)
                return time.perf_counter() - t0
            return run

        subprocess.run(cat_cmd, check=True)  # warm the cache
        warm = interleave({"ckptmgr verify": timed(verify_cmd, False), "cat": timed(cat_cmd, False)}, reps)
        row = {"size_bytes": total, "warm": warm,
               "warm_ratio_throughput": warm["cat"] / warm["ckptmgr verify"]}
        if cold_ok:
            cold = interleave({"ckptmgr verify": timed(verify_cmd, True), "cat": timed(cat_cmd, True)},
                              max(3, reps // 2))
            row.update(cold=cold, cold_ratio_throughput=cold["cat"] / cold["ckptmgr verify"])
        rows.append(row)
        shutil.rmtree(run_dir)
    return rows


def bench_quick_verify(work: str, files: int, reps: int) -> dict:
    run_dir = os.path.join(work, "many-files")
    with CheckpointManager(run_dir, keep_last=None) as manager, manager.stage(step=1) as staging:
        for index in range(files):
            with staging.open_file(f"f/{index:05d}.bin") as f:
                f.write(b"x" * 64)
    ckpt = os.path.join(run_dir, "step=1.ckpt")
    seconds = interleave({"quick": lambda: _time(lambda: verify_checkpoint(ckpt, quick=True))}, reps)["quick"]
    start = interleave({"ckptmgr --version": lambda: _time_cmd([sys.executable, "-m", "ckptmgr", "--version"]),
                        "python -c pass": lambda: _time_cmd([sys.executable, "-c", "pass"])}, reps)
    shutil.rmtree(run_dir)
    return {"files": files, "quick_seconds": seconds, "ms_per_1000_files": 1000 * seconds / files * 1000 / 1000,
            "cli_start": start}


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time_cmd(cmd: list[str]) -> float:
    return _time(lambda: subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL))


# -- 3. resume ----------------------------------------------------------------
def bench_resume(work: str, size: int, reps: int) -> dict:
    run_dir = os.path.join(work, "resume")
    state = state_of(size)
    with CheckpointManager(run_dir, keep_last=None) as manager:
        good = manager.save(state, step=1)
        bad = manager.save(state, step=2)
    del state
    manager = CheckpointManager(run_dir)

    def consume(state: dict) -> float:
        # Resuming means the bytes reach the model: touch every tensor, so a lazy (mmap) load hides nothing.
        return float(sum(t.sum() for t in state["state_dict"].values()))

    def plain_load() -> dict:
        return torch.load(good.load_path, weights_only=True)

    plain = interleave({"verified load (newest intact)": lambda: _time(lambda: consume(manager.load(good))),
                        "torch.load": lambda: _time(lambda: consume(plain_load()))}, reps)
    with open(bad.load_path, "r+b") as f:  # corrupt the newest: resume must fall back
        f.seek(os.path.getsize(bad.load_path) // 2)
        f.write(b"\xff")
    fallback = interleave({
        "load with fallback": lambda: _time(lambda: consume(manager.load())),
        "verify(bad) + load(good)": lambda: _time(lambda: (verify_checkpoint(bad.path), consume(plain_load()))),
    }, reps)
    shutil.rmtree(run_dir)
    return {"size_bytes": size, **plain, **fallback,
            "ratio_verified_vs_plain": plain["verified load (newest intact)"] / plain["torch.load"],
            "ratio_fallback_vs_bound": fallback["load with fallback"] / fallback["verify(bad) + load(good)"]}


# -- 4. export ----------------------------------------------------------------
def bench_export(work: str, width: int, reps: int) -> dict | None:
    out = os.path.join(work, "zero3")
    worker = os.path.join(HERE, "zero3_fixture.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           worker, out, str(width)], capture_output=True, text=True,
                          env=dict(ENV, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    src = os.path.join(out, "step=1.ckpt")
    # DeepSpeed's consolidation as Lightning's converter runs it (convert_zero_checkpoint_to_fp32_state_dict
    # itself now needs huggingface_hub for its sharding step).
    reference = ("import sys, torch; from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint"
                 " as g; torch.save(g(sys.argv[1]), sys.argv[2])")
    results: dict[str, list[dict]] = {"ckptmgr export": [], "zero_to_fp32": []}
    for rep in range(reps):
        for name in results:
            target = os.path.join(work, f"export-{name.split()[0]}-{rep}")
            cmd = ([sys.executable, "-m", "ckptmgr", "export", src, "-o", target] if name == "ckptmgr export"
                   else [sys.executable, "-c", reference, src, target])
            results[name].append(measure_isolated(cmd, env=dict(ENV, DS_ACCELERATOR="cpu")))
            shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.path.exists(target) and \
                os.unlink(target)
    summary = {name: {"seconds": statistics.median(r["seconds"] for r in runs),
                      "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs),
                      "failures": sum(r["returncode"] != 0 for r in runs),
                      "last_error": next((r["stderr"][-1500:] for r in runs if r["returncode"] != 0), None)}
               for name, runs in results.items()}
    shard_bytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(src, "checkpoint", "*optim_states.pt")))
    shutil.rmtree(out)
    a, b = summary["ckptmgr export"], summary["zero_to_fp32"]
    return {**summary, "optimizer_shard_bytes": shard_bytes, "time_ratio": a["seconds"] / b["seconds"],
            "rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"]}


# -- 6. DCP (FSDP2) -----------------------------------------------------------
DCP_TO_TORCH_SAVE = ("import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
                     "dcp_to_torch_save(sys.argv[1], sys.argv[2])")


def bench_dcp(work: str, width: int, reps: int, nproc: int = 2) -> dict:
    """Saves side by side on ``nproc`` ranks (benchmarks/dcp_fixture.py; GPUs when there are), then export vs
    ``dcp_to_torch_save``."""
    out = os.path.join(work, "dcp")
    env = ENV if torch.cuda.is_available() else dict(ENV, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), os.path.join(HERE, "dcp_fixture.py"), out, str(width), str(reps)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    saves = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    src = CheckpointManager(os.path.join(out, "run")).resolve().path
    runs: dict[str, list[dict]] = {"ckptmgr export": [], "dcp_to_torch_save": []}
    parity = None
    for rep in range(reps):
        for name in runs:
            target = os.path.join(work, f"dcp-export-{name.split()[0]}-{rep}")
            cmd = ([sys.executable, "-m", "ckptmgr", "export", src, "-o", target] if name == "ckptmgr export"
                   else [sys.executable, "-c", DCP_TO_TORCH_SAVE, src, target])
            runs[name].append(measure_isolated(cmd, env=ENV))
        if parity is None:
            parity = export_parity(os.path.join(work, "dcp-export-ckptmgr-0", "model.safetensors"),
                                   os.path.join(work, "dcp-export-dcp_to_torch_save-0"))
        for name in runs:
            target = os.path.join(work, f"dcp-export-{name.split()[0]}-{rep}")
            shutil.rmtree(target) if os.path.isdir(target) else os.path.exists(target) and os.unlink(target)
    export = {name: {"seconds": statistics.median(r["seconds"] for r in results),
                     "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in results),
                     "failures": sum(r["returncode"] != 0 for r in results)} for name, results in runs.items()}
    shutil.rmtree(out)
    a, b = export["ckptmgr export"], export["dcp_to_torch_save"]
    return {"saves": saves, "export": export, "parity": parity, "time_ratio": a["seconds"] / b["seconds"],
            "rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"]}


def export_parity(safetensors_file: str, torch_file: str) -> dict:
    """Every tensor of the export bitwise equal to ``dcp_to_torch_save``'s (flattened the same way)."""
    from safetensors.torch import load_file

    ours = load_file(safetensors_file)
    theirs = dict(_flatten(torch.load(torch_file, weights_only=False)))
    tensors = {k: v for k, v in theirs.items() if isinstance(v, torch.Tensor)}
    equal = ours.keys() == tensors.keys() and all(
        ours[k].dtype == tensors[k].dtype and torch.equal(ours[k], tensors[k]) for k in ours)
    return {"tensors": len(ours), "bitwise_equal": equal}


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# -- 5. walk ------------------------------------------------------------------
def bench_walk(work: str, files: int, reps: int) -> dict:
    root = os.path.join(work, "volume")
    runs, per_run = max(1, files // 100), 10
    for r in range(runs):
        with CheckpointManager(os.path.join(root, f"exp{r % 10}", f"run{r}"), keep_last=None) as manager:
            for step in range(1, per_run + 1):
                with manager.stage(step=step) as staging:
                    for index in range(files // runs // per_run - 1):
                        with staging.open_file(f"shard{index}.bin") as f:
                            f.write(b"y" * 128)
    count = sum(len(f) for _, _, f in os.walk(root))
    seconds = interleave({"walk --quick": lambda: _time_cmd([sys.executable, "-m", "ckptmgr", "walk", root,
                                                              "--quick", "--json"])}, reps)["walk --quick"]
    shutil.rmtree(root)
    return {"files": count, "runs": runs, "seconds": seconds}


# -- report -------------------------------------------------------------------
def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def render(results: dict, machine: str) -> str:
    lines = ["# Benchmarks", "",
             "Written by `python benchmarks/run.py` (CPU tables; a section can be re-measured alone with `--reuse`, "
             "so sections may come from different invocations, but within a section every compared method ran in "
             "the same invocation), and from "
             "`benchmarks/results/*.json` (GPU tables, written by `benchmarks/gpu/*.py`). Every figure is the "
             "median of interleaved repetitions; ratios compare methods measured side by side in the same run. "
             "Absolute times drift between machines; the ratios are what the targets are about.", "",
             f"## CPU ({machine}; {results['reps']} repetitions)", ""]
    lines += ["### 1. Save: managed save vs `torch.save` + fsync (target <= 1.05x)", "",
              "| state | managed | torch.save+fsync | ratio |", "|---|---|---|---|"]
    for r in results["save"]:
        lines.append(f"| {gb(r['size_bytes'])} | {r['managed']:.3f} s | {r['torch.save+fsync']:.3f} s | "
                     f"{r['ratio']:.2f}x |")
    lines += ["", "### 2. Verify: `ckptmgr verify` end to end (process start included) vs `cat FILES > /dev/null` "
              "(target >= 0.8x the read throughput)", "",
              "| data | cache | ckptmgr verify | cat | throughput ratio |", "|---|---|---|---|---|"]
    lines += _verify_rows(results["verify"])
    if not any("cold" in r for r in results["verify"]):
        lines.append("| | cold | not measured: /proc/sys/vm/drop_caches is not writable here | | |")
    lines += ["", "With two cores, hashing a gigabyte takes about as long as starting Python and importing ckptmgr "
              "(CLI start below), so the 1 GB warm case stays under the target here; the same benchmark on a "
              "16-core host is under GPU below (`benchmarks/gpu/verify_host.py`)."]
    q = results["quick"]
    lines += ["", f"Quick mode (manifest + sizes): {q['files']} files in {1000 * q['quick_seconds']:.1f} ms = "
              f"**{1000 * q['quick_seconds'] / q['files'] * 1000:.2f} ms per 1,000 files** (target <= 10 ms). "
              f"CLI start (`ckptmgr --version`, no torch import): {1000 * q['cli_start']['ckptmgr --version']:.0f} ms "
              f"vs `python -c pass` {1000 * q['cli_start']['python -c pass']:.0f} ms.", ""]
    r = results["resume"]
    lines += [f"### 3. Resume ({gb(r['size_bytes'])} checkpoint; each method also reads every tensor once)", "",
              "| | seconds | ratio | target |", "|---|---|---|---|",
              f"| `CheckpointManager.load` (hash, then torch.load with mmap) vs `torch.load` as Lightning calls it | "
              f"{r['verified load (newest intact)']:.3f} vs "
              f"{r['torch.load']:.3f} | {r['ratio_verified_vs_plain']:.2f}x | <= 1.10x |",
              f"| corrupt newest: load with fallback vs verify(bad) + load(good) | {r['load with fallback']:.3f} vs "
              f"{r['verify(bad) + load(good)']:.3f} | {r['ratio_fallback_vs_bound']:.2f}x | <= 1.0x |", ""]
    e = results.get("export")
    lines += ["### 4. Export: `ckptmgr export` vs DeepSpeed's `zero_to_fp32` on the same ZeRO-3 checkpoint "
              "(2 ranks, CPU)", ""]
    failed = e is not None and "error" not in e and (e["ckptmgr export"]["failures"] or e["zero_to_fp32"]["failures"])
    if failed:
        lines += ["A side failed in this run, so no figures are reported (see the raw JSON).", ""]
    elif e and "error" not in e:
        a, b = e["ckptmgr export"], e["zero_to_fp32"]
        lines += ["| | time | peak RSS |", "|---|---|---|",
                  f"| ckptmgr export | {a['seconds']:.2f} s | {gb(a['peak_rss_bytes'])} |",
                  f"| DeepSpeed: get_fp32_state_dict_from_zero_checkpoint + torch.save | {b['seconds']:.2f} s | "
                  f"{gb(b['peak_rss_bytes'])} |",
                  f"| ratio (targets: time <= 1.0x, RSS <= 0.5x) | {e['time_ratio']:.2f}x | {e['rss_ratio']:.2f}x |",
                  "", f"Optimizer shards: {gb(e['optimizer_shard_bytes'])}.", ""]
    else:
        lines += ["Not run in this invocation.", ""]
    w = results["walk"]
    lines += [f"### 5. Walk: `ckptmgr walk --quick` over {w['files']:,} files in {w['runs']} runs: "
              f"**{w['seconds']:.2f} s** (process start included)", ""]
    lines += _render_dcp(results.get("dcp"))
    lines += render_gpu()
    return "\n".join(lines) + "\n"


def _render_dcp(d: dict | None) -> list[str]:
    lines = ["### 6. PyTorch Distributed Checkpoint: FSDP2 on 2 ranks (CPU, gloo)", ""]
    if not d or "error" in d or any(r["failures"] for r in d["export"].values()):
        return lines + ["Not run, or a side failed, in this invocation (see the raw JSON).", ""]
    m, s = d["saves"]["medians"], d["saves"]
    lines += [f"Checkpoint: {gb(s['checkpoint_bytes'])} (8 x Linear({s['width']}, {s['width']}) with AdamW state), "
              f"{s['reps']} interleaved repetitions.", "",
              "| | plain DCP | ckptmgr.dcp | ratio |", "|---|---|---|---|",
              f"| save (every file written, hashed, fsynced; committed) | {m['dcp.save']:.3f} s | "
              f"{m['ckptmgr.dcp.save']:.3f} s | {m['ckptmgr.dcp.save'] / m['dcp.save']:.2f}x |",
              f"| async_save stall (until the call returns) | {m['dcp.async_save stall']:.3f} s | "
              f"{m['ckptmgr.dcp.async_save stall']:.3f} s | "
              f"{m['ckptmgr.dcp.async_save stall'] / m['dcp.async_save stall']:.2f}x |",
              f"| async_save until the future resolves | {m['dcp.async_save total']:.3f} s | "
              f"{m['ckptmgr.dcp.async_save total']:.3f} s | "
              f"{m['ckptmgr.dcp.async_save total'] / m['dcp.async_save total']:.2f}x |", ""]
    a, b = d["export"]["ckptmgr export"], d["export"]["dcp_to_torch_save"]
    parity = d["parity"]
    lines += ["Export of the managed checkpoint (every tensor, optimizer state included):", "",
              "| | time | peak RSS |", "|---|---|---|",
              f"| `ckptmgr export` (safetensors, streamed) | {a['seconds']:.2f} s | {gb(a['peak_rss_bytes'])} |",
              f"| `dcp_to_torch_save` | {b['seconds']:.2f} s | {gb(b['peak_rss_bytes'])} |",
              f"| ratio | {d['time_ratio']:.2f}x | {d['rss_ratio']:.2f}x |", "",
              f"Parity: {parity['tensors']} tensors, bitwise equal to `dcp_to_torch_save`'s: "
              f"{'yes' if parity['bitwise_equal'] else 'NO'}.", ""]
    return lines


def render_gpu() -> list[str]:
    lines = ["## GPU (from benchmarks/results/*.json)", ""]
    path = os.path.join(HERE, "results")
    lines += _render_stall_free(os.path.join(path, "gpu_h200_stall_free_single.json"),
                                os.path.join(path, "gpu_h200_stall_free_throughput.json"),
                                os.path.join(path, "gpu_h200_stall_free_deepspeed_1gpu.json"))
    stalls = sorted(glob.glob(os.path.join(path, "gpu_*async_stall*.json")))
    for file in stalls:
        with open(file) as f:
            d = json.load(f)
        lines += [f"### Training stall per checkpoint, {d['state_bytes'] / 1e9:.1f} GB of state (1.0 B params + "
                  f"AdamW), {d['device']}, torch {d['torch']}, median of {d['repetitions']} "
                  f"(`{os.path.basename(file)}`)", "",
                  "| method | stall | total (until durable) | stall per GB |", "|---|---|---|---|"]
        for name, m in d["methods"].items():
            lines.append(f"| {name} | {m['stall_s']:.3f} s | {m['total_s']:.2f} s | {m['stall_ms_per_gb']:.1f} ms |")
        lines += [""] + [f"- {k}: {v}" for k, v in d["ratios"].items()]
        lines += [f"- note: {note}" for note in d.get("notes", [])] + [""]
    lines += _render_persist(os.path.join(path, "gpu_h100_persist_breakdown.json"))
    lines += _render_host_verify(os.path.join(path, "gpu_h100_host_verify.json"))
    for file in sorted(glob.glob(os.path.join(path, "gpu_*deepspeed_stage*.json"))):
        with open(file) as f:
            d = json.load(f)
        ex = d["export"]
        gpu = "H200" if "h200" in os.path.basename(file) else "H100"
        lines += [f"### DeepSpeed ZeRO-{d['stage']} through Lightning, {d.get('devices', 2)}x {gpu} "
                  f"(`{os.path.basename(file)}`)", "",
                  f"- save per save event: ManagedCheckpoint {d['managed_save']['seconds_per_save_event']:.2f} s "
                  f"(one write, hashed, fsynced, committed; `last` is an alias) vs Lightning's ModelCheckpoint "
                  f"{d['lightning_save']['seconds_per_save_event']:.2f} s ({d['lightning_save']['writes']} writes for "
                  f"2 events: `last.ckpt` is a second full copy; no fsync), checkpoint "
                  f"{d['lightning_save']['checkpoint_bytes'] / 1e9:.2f} GB",
                  f"- SIGKILL after step {d['kill']['killed_after_step']}, resumed from "
                  f"`{os.path.basename(d['resume']['resumed_from'])}` to step {d['resume']['end_step']} "
                  f"(complete: {d['resume']['complete']}); `ckptmgr verify` exit {d['verify']['exit']}",
                  f"- export: ckptmgr {ex['ckptmgr']['seconds']:.1f} s / {gb(ex['ckptmgr']['peak_rss_bytes'])} peak "
                  f"RSS vs DeepSpeed (via Lightning's converter) {ex['deepspeed_via_lightning']['seconds']:.1f} s / "
                  f"{gb(ex['deepspeed_via_lightning']['peak_rss_bytes'])}; bitwise equal: "
                  f"{ex.get('parity', {}).get('bitwise_equal')}/{ex.get('parity', {}).get('tensors_reference')} "
                  f"tensors"] + [f"- note: {note}" for note in d.get("notes", [])] + [""]
    return lines


def _read_result(file: str) -> dict | None:
    """A GPU run's raw JSON, or None when that run has not been made."""
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return json.load(f)


def _render_stall_free(single_file: str, throughput_file: str, deepspeed_file: str) -> list[str]:
    """benchmarks/gpu/stall_free.py: the overlapped snapshot (one GPU) and async DeepSpeed saves."""
    d = _read_result(single_file)
    if d is None:
        return []
    bound = d["stall_seconds"]["pinned_copy"]["median"]
    names = {"overlapped": "ckptmgr overlapped (`AsyncCheckpointer`)",
             "today": "ckptmgr, copy blocking (`overlap=False`)",
             "pinned_copy": "copy into preallocated pinned buffers", "dcp_async": "DCP `async_save`",
             "torch_save": "`torch.save` + fsync"}
    model = d["model"]
    lines = [f"### Stall-free saves, {d['state_bytes'] / 1e9:.1f} GB of state (1.0 B params + AdamW), "
             f"{d['device']}, torch {d['torch']} (`{os.path.basename(single_file)}`; method in docs/GPU.md)", "",
             f"A step: {model['layers']} x Linear({model['width']}, {model['width']}), {model['dtype']}, batch of "
             f"{model['batch_rows']} rows, {d['step_seconds_median']:.3f} s. Repetitions: "
             f"{len(d['stall_seconds']['overlapped']['all'])}, methods interleaved.", "",
             "| method | stall per save (median) | largest | median / pinned-copy bound | largest / bound |",
             "|---|---|---|---|---|"]
    for key, m in d["stall_seconds"].items():
        worst = max(m["all"])
        lines.append(f"| {names.get(key, key)} | {m['median']:.4f} s | {worst:.4f} s | {m['median'] / bound:.3f}x | "
                     f"{worst / bound:.3f}x |")
    issue = d.get("overlapped_host_seconds", {})
    if issue:
        lines += ["", f"The overlapped save's own host time: {issue['overlapped_issue'] * 1e3:.1f} ms to issue the "
                  f"copy, {issue['overlapped_wait'] * 1e3:.2f} ms waited by the next optimizer step (medians). A stall "
                  "below zero is a step-time fluctuation: the save costs less than the noise of two steps."]
    lines.append("")
    for file in sorted(glob.glob(throughput_file.replace(".json", "*.json"))):
        lines += _render_throughput(file)
    lines += _render_deepspeed_stall(deepspeed_file)
    return lines


def _render_throughput(file: str) -> list[str]:
    d = _read_result(file)
    if d is None:
        return []
    t = d["throughput"]
    lines = [f"Training throughput, same model and batch (`{os.path.basename(file)}`): windows of "
             f"{t['none']['steps'] // t['none']['windows']} steps in the order {', '.join(t['order'])} "
             "(a drift of the GPU's speed weighs on every configuration alike); saves at steps 0, N, 2N, ... of "
             "a window, their persists inside it.", "",
             "| saves | windows | steps | saves made | steps/s | ratio to none | time lost per save |",
             "|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys(t["order"]):
        v = t[key]
        lost = f"{v['seconds_lost_per_save']:.3f} s" if "seconds_lost_per_save" in v else "-"
        lines.append(f"| {key.replace('_', ' ')} | {v['windows']} | {v['steps']} | {v['saves']} | "
                     f"{v['steps_per_second']:.4f} | {v['ratio_to_none']:.4f}x | {lost} |")
    runs = [r for windows in t["windows"].values() for r in windows]
    left = max(r["persist_left_at_end_seconds"] for r in runs)
    lines += ["", f"Longest persist still running at a window's end: {left:.3f} s."]
    persists = [p for r in runs for p in r.get("persist_seconds", [])]
    calls = [c for r in runs for c in r.get("save_call_seconds", [])]
    if persists:  # recorded since the second run
        lines.append(f"Persist of a save (write, fsync, hash, commit, retention): {min(persists):.1f}-"
                     f"{max(persists):.1f} s; `save()` calls: {', '.join(f'{c:.3f}' for c in calls)} s (a call waits "
                     "for the previous save's persist when it is still running: one save in flight).")
    return lines + [""]


def _render_deepspeed_stall(file: str) -> list[str]:
    ds = _read_result(file)
    if ds is None:
        return []
    lines = [f"Lightning `DeepSpeedStrategy`, {ds['devices']} GPU(s), stall per save event "
             f"(`{os.path.basename(file)}`): the median over the save events after the first; the first event "
             "allocates the pinned buffers and is shown apart.", "",
             "| ZeRO | checkpoint | ckptmgr async | first async save | ckptmgr sync | Lightning's own | "
             "pinned copy of the shards | async / copy | Lightning / async | export = zero_to_fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, m in ds["stages"].items():
        a, s, light = m["managed_async"], m["managed_sync"], m["lightning"]
        export = m["export"]
        lines.append(f"| {stage} | {a['checkpoint_bytes'] / 1e9:.2f} GB | {a['stall_per_save_event']:.3f} s | "
                     f"{a.get('first_save_stall') or float('nan'):.2f} s | {s['stall_per_save_event']:.2f} s | "
                     f"{light['stall_per_save_event']:.2f} s | {a['pinned_copy_seconds']:.3f} s | "
                     f"{m['ratios']['async_to_pinned_copy']:.2f}x | {m['ratios']['lightning_to_async']:.0f}x | "
                     f"{export.get('bitwise_equal')}/{export.get('tensors')} tensors |")
    return lines + [""]


def _render_persist(file: str) -> list[str]:
    d = _read_result(file)
    if d is None:
        return []
    lines = [f"### Persist breakdown, {d['state_bytes'] / 1e9:.1f} GB of CPU state, {d['cores']} cores, median of "
             f"{d['reps']} (`{os.path.basename(file)}`, `benchmarks/gpu/persist_breakdown.py`)", "",
             "| method | total | phases | throughput vs raw |", "|---|---|---|---|"]
    for name, m in d["methods"].items():
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in m.items() if k != "total")
        lines.append(f"| {name} | {m['total']:.2f} s | {phases} | {d['throughput_vs_raw'][name]:.2f}x |")
    lines += ["", "- note: an exploratory run. Deleting 12 GB takes seconds on this disk (ext4 mounted with "
              "`discard`), and here deletions fell inside some timings (raw_write truncates its previous file, "
              "manager_save's retention deletes the previous checkpoint: publish+alias+retention) or overlapped "
              "the next method (payload_w8 deletes its file after timing); the stall tables above were measured "
              "with every deletion outside the timings. The phases show that writing the bytes into the page "
              "cache and the final fsync dominate; hashing runs beside the writes.", ""]
    return lines


def _render_host_verify(file: str) -> list[str]:
    d = _read_result(file)
    if d is None:
        return []
    return [f"### Verify on the GPU host ({d['host']}; median of {d['reps']}; `{os.path.basename(file)}`)", "",
            "| data | cache | ckptmgr verify | cat | throughput ratio |", "|---|---|---|---|---|",
            *_verify_rows(d["verify"]), ""]


def _verify_rows(rows: list[dict]) -> list[str]:
    """Table rows of the verify benchmark (bench_verify's output), warm and, where measured, cold."""
    return [f"| {gb(r['size_bytes'])} | {cache} | {r[cache]['ckptmgr verify']:.3f} s | {r[cache]['cat']:.3f} s | "
            f"{r[cache + '_ratio_throughput']:.2f}x |" for r in rows for cache in ("warm", "cold") if cache in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "BENCHMARKS.md"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="sections to skip: save verify quick resume export walk dcp")
    parser.add_argument("--reuse", default=None, help="start from the raw results of an earlier run (JSON) and "
                                                      "rerun only the sections not skipped")
    args = parser.parse_args()
    reps = args.reps or (2 if args.smoke else 5)
    mb = 1024 * 1024
    sizes = dict(save=[4 * mb] if args.smoke else [256 * mb, 1024 * mb, 4096 * mb],
                 verify=[8 * mb] if args.smoke else [1024 * mb, 10240 * mb],
                 resume=8 * mb if args.smoke else 1024 * mb, quick=200 if args.smoke else 1000,
                 walk=500 if args.smoke else 10_000, width=64 if args.smoke else 3072,
                 dcp_width=64 if args.smoke else 3072)
    work = tempfile.mkdtemp(prefix="ckptmgr-bench-", dir=os.environ.get("CKPTMGR_BENCH_DIR"))
    results: dict = {"reps": reps}
    if args.reuse:
        with open(args.reuse) as f:
            results = json.load(f)
    try:
        steps = {"save": lambda: bench_save(work, sizes["save"], reps),
                 "verify": lambda: bench_verify(work, sizes["verify"], reps),
                 "quick": lambda: bench_quick_verify(work, sizes["quick"], reps),
                 "resume": lambda: bench_resume(work, sizes["resume"], reps),
                 "export": lambda: bench_export(work, sizes["width"], reps if not args.smoke else 1),
                 "walk": lambda: bench_walk(work, sizes["walk"], reps),
                 "dcp": lambda: bench_dcp(work, sizes["dcp_width"], reps)}
        for name, step in steps.items():
            if name in args.skip:
                continue
            t0 = time.monotonic()
            results[name] = step()
            print(f"{name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = (f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
               f"torch {torch.__version__}")
    text = render(results, machine)
    with open(args.output, "w") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    print(text)


if __name__ == "__main__":
    main()
