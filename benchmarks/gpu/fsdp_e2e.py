"""FSDP and PyTorch Distributed Checkpoint on GPUs: Lightning's FSDPStrategy through ManagedCheckpoint, and
``ckptmgr.dcp`` next to plain DCP.

Side by side in one run:
  lightning  the trainer with FSDPStrategy(state_dict_type="sharded"): Lightning's own ModelCheckpoint
             (--checkpointing lightning) vs ManagedCheckpoint, seconds per save event; the managed run is
             SIGKILLed (process group) after its checkpoint at 2*SAVE, resumed to 3*SAVE, verified; then a
             byte of a rank's shard of the newest checkpoint is flipped and a resume must fall back past it
  dcp        benchmarks/dcp_fixture.py on every GPU (FSDP2): dcp.save vs ckptmgr.dcp.save, and the
             async_save stall of each; then `ckptmgr export` vs `dcp_to_torch_save` on the checkpoint:
             time, peak RSS, bitwise parity

    python benchmarks/gpu/fsdp_e2e.py --devices 2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from deepspeed_e2e import du, kill_after_step, run_json  # noqa: E402
from measure import measure_isolated as measure  # noqa: E402


def trainer_cmd(args: argparse.Namespace, run: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training", "--strategy", "fsdp", "--devices", str(args.devices),
            "--accelerator", "gpu", "--precision", "bf16-mixed", "--width", str(args.width), "--layers",
            str(args.layers), "--save-step", str(args.save_step), "--output-dir", args.work, "--run-name", run,
            "--no-progress-bar", "--json", *extra]


def lightning_report(args: argparse.Namespace) -> dict:
    out, save = args.out, args.save_step
    report: dict = {"devices": args.devices, "width": args.width, "layers": args.layers}
    base = run_json(trainer_cmd(args, "base", "--checkpointing", "lightning", "--max-steps", str(2 * save)),
                    f"{out}/fsdp_base.log")
    base_dir = os.path.join(args.work, "runs", "base")
    report["lightning_save"] = {"writes": base["checkpoints_written"], "save_seconds_total": base["save_seconds"],
                                "seconds_per_save_event": base["save_seconds"] / 2,
                                "checkpoint_bytes": du(os.path.join(base_dir, f"epoch=0-step={save}.ckpt"))}
    run_dir = os.path.join(args.work, "runs", "managed")
    report["kill"] = kill_after_step(trainer_cmd(args, "managed", "--max-steps", "100000"), run_dir, 2 * save,
                                     f"{out}/fsdp_managed_killed.log")
    resumed = run_json(trainer_cmd(args, "managed", "--max-steps", str(3 * save)), f"{out}/fsdp_managed.log")
    report["resume"] = {k: resumed[k] for k in ("resumed_from", "start_step", "end_step", "complete",
                                                "checkpoints_written", "save_seconds")}
    report["managed_save"] = {"seconds_per_save_event": resumed["save_seconds"] /
                              max(1, resumed["checkpoints_written"])}
    verify = subprocess.run([sys.executable, "-m", "ckptmgr", "verify", run_dir, "--json"], capture_output=True,
                            text=True)
    verified = json.loads(verify.stdout)
    report["verify"] = {"exit": verify.returncode, "all_valid": verified["all_valid"],
                        "checkpoints": [(c["name"], c["status"], c["bytes"]) for c in verified["checkpoints"]]}
    from ckptmgr.catalog import resolve

    newest = resolve(run_dir)
    report["layout"] = {"kind": newest.manifest.kind, "files": sorted(f.path for f in newest.manifest.files),
                        "shards": newest.manifest.layout.get("shards")}
    report["export"] = export_report(newest.path, args.work, "fsdp")
    shard = os.path.join(newest.path, "__0_0.distcp")  # `last.ckpt` is a hard link: it shares the flip
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    fallback = run_json(trainer_cmd(args, "managed", "--max-steps", str(3 * save + 2)), f"{out}/fsdp_fallback.log")
    report["fallback"] = {"corrupted": newest.name, "resumed_from": fallback["resumed_from"],
                          "start_step": fallback["start_step"], "end_step": fallback["end_step"]}
    return report


def export_report(src: str, work: str, tag: str) -> dict:
    ours_dir, reference = f"{work}/export-{tag}", f"{work}/reference-{tag}.pt"
    ours = measure([sys.executable, "-m", "ckptmgr", "export", src, "-o", ours_dir, "--json"])
    code = ("import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
            "dcp_to_torch_save(sys.argv[1], sys.argv[2])")
    theirs = measure([sys.executable, "-c", code, src, reference])
    report = {"ckptmgr": {k: ours[k] for k in ("returncode", "seconds", "peak_rss_bytes")},
              "dcp_to_torch_save": {k: theirs[k] for k in ("returncode", "seconds", "peak_rss_bytes")},
              "checkpoint_bytes": du(src)}
    if ours["returncode"] == 0 and theirs["returncode"] == 0:
        from run import export_parity

        report["parity"] = export_parity(os.path.join(ours_dir, "model.safetensors"), reference)
    else:
        report["stderr"] = (ours["stderr"] + theirs["stderr"])[-3000:]
    shutil.rmtree(ours_dir, ignore_errors=True)
    if os.path.exists(reference):
        os.unlink(reference)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--work", default="/tmp/ckptmgr-gpu-fsdp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--save-step", type=int, default=20)
    parser.add_argument("--dcp-width", type=int, default=8192, help="FSDP2 fixture: 8 x Linear(W, W) + AdamW")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=["lightning", "dcp"])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)  # a warm machine keeps /tmp between calls
    os.makedirs(args.work)
    import torch

    for part in args.parts:
        started = time.monotonic()
        if part == "lightning":
            report = lightning_report(args)
        else:
            from run import bench_dcp

            report = bench_dcp(args.work, args.dcp_width, args.reps, nproc=args.devices)
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        report["gpu"] = torch.cuda.get_device_name()
        report["torch"] = torch.__version__
        with open(os.path.join(args.out, f"fsdp_{part}_gpus{args.devices}.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
