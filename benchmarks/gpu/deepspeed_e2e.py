"""DeepSpeed ZeRO-2/3 on 2 GPUs (``--devices``) through Lightning and ManagedCheckpoint: train, SIGKILL, resume,
export.

Side by side in one run, per stage:
  baseline  the trainer with Lightning's own ModelCheckpoint (--checkpointing lightning): save time
  managed   the trainer with ManagedCheckpoint, SIGKILLed (process group) after the checkpoint at 2*SAVE,
            then resumed to 3*SAVE; `ckptmgr verify` of the run directory
  export    `ckptmgr export` vs Lightning's convert_zero_checkpoint_to_fp32_state_dict (DeepSpeed's
            zero_to_fp32) on the same checkpoint: time, peak RSS, and bitwise equality

    python benchmarks/gpu/deepspeed_e2e.py --stages 2 3 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from measure import measure_isolated as measure  # noqa: E402


def trainer_cmd(args: argparse.Namespace, stage: int, run: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training", "--strategy", "deepspeed", "--deepspeed-stage", str(stage),
            "--devices", str(args.devices), "--accelerator", "gpu", "--precision", "bf16-mixed",
            "--width", str(args.width), "--layers", str(args.layers), "--save-step", str(args.save_step),
            "--output-dir", args.work, "--run-name", run, "--no-progress-bar", "--json", *extra]


def run_json(cmd: list[str], log: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    if proc.returncode not in (0, 75):
        raise SystemExit(f"{cmd} failed ({proc.returncode}); see {log}")
    # The summary is the last thing printed; DeepSpeed logs to stdout before it.
    return json.loads(proc.stdout[proc.stdout.rindex('{\n  "run_dir"'):])


def kill_after_step(cmd: list[str], run_dir: str, step: int, log: str) -> dict:
    from ckptmgr.catalog import resolve

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < 600:
            found = resolve(run_dir, quick=True) if os.path.isdir(run_dir) else None
            if found is not None and found.step >= step:
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # every rank, mid-training
        proc.wait()
    return {"killed_after_step": found.step if found else None, "returncode": proc.returncode}


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def compare(ours_dir: str, reference_file: str) -> dict:
    import torch
    from safetensors.torch import load_file

    ours = {}
    for name in sorted(os.listdir(ours_dir)):
        if name.endswith(".safetensors"):
            ours.update(load_file(os.path.join(ours_dir, name)))
    reference = torch.load(reference_file, map_location="cpu", weights_only=False)["state_dict"]
    common = sorted(set(ours) & set(reference))
    equal = sum(torch.equal(ours[k], reference[k].contiguous()) for k in common)
    return {"tensors_ours": len(ours), "tensors_reference": len(reference), "common": len(common),
            "bitwise_equal": equal, "all_equal": equal == len(common) == len(ours) == len(reference)}


def stage_report(args: argparse.Namespace, stage: int) -> dict:
    out, save = args.out, args.save_step
    report: dict = {"stage": stage, "devices": args.devices}
    base = run_json(trainer_cmd(args, stage, f"base{stage}", "--checkpointing", "lightning",
                                "--max-steps", str(2 * save)), f"{out}/base{stage}.log")
    base_dir = os.path.join(args.work, "runs", f"base{stage}")
    report["lightning_save"] = {"save_events": 2, "writes": base["checkpoints_written"],
                                "save_seconds_total": base["save_seconds"],
                                "seconds_per_save_event": base["save_seconds"] / 2,
                                "checkpoint_bytes": du(os.path.join(base_dir, f"epoch=0-step={save}.ckpt"))}
    run = f"managed{stage}"
    run_dir = os.path.join(args.work, "runs", run)
    report["kill"] = kill_after_step(trainer_cmd(args, stage, run, "--max-steps", "100000"), run_dir, 2 * save,
                                     f"{out}/managed{stage}_killed.log")
    resumed = run_json(trainer_cmd(args, stage, run, "--max-steps", str(3 * save)), f"{out}/managed{stage}.log")
    report["resume"] = {k: resumed[k] for k in ("resumed_from", "start_step", "end_step", "complete",
                                                "checkpoints_written", "save_seconds")}
    per_save = resumed["save_seconds"] / max(1, resumed["checkpoints_written"])
    report["managed_save"] = {"seconds_per_save_event": per_save}
    verify = subprocess.run([sys.executable, "-m", "ckptmgr", "verify", run_dir, "--json"], capture_output=True,
                            text=True)
    verified = json.loads(verify.stdout)
    report["verify"] = {"exit": verify.returncode, "all_valid": verified["all_valid"],
                        "checkpoints": [(c["name"], c["status"], c["bytes"]) for c in verified["checkpoints"]]}
    from ckptmgr.catalog import resolve

    newest = resolve(run_dir).path
    ours = measure([sys.executable, "-m", "ckptmgr", "export", newest, "-o", f"{args.work}/export{stage}",
                    "--strip-prefix", "_forward_module.", "--json"])
    reference_file = f"{args.work}/reference{stage}.pt"
    code = ("import sys; from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict"
            " as c; c(sys.argv[1], sys.argv[2])")
    reference = measure([sys.executable, "-c", code, newest, reference_file])
    report["export"] = {"ckptmgr": {k: ours[k] for k in ("returncode", "seconds", "peak_rss_bytes")},
                        "deepspeed_via_lightning": {k: reference[k] for k in ("returncode", "seconds",
                                                                               "peak_rss_bytes")},
                        "output_bytes": du(f"{args.work}/export{stage}")}
    if ours["returncode"] == 0 and reference["returncode"] == 0:
        report["export"]["parity"] = compare(f"{args.work}/export{stage}", reference_file)
    else:
        report["export"]["stderr"] = (ours["stderr"] + reference["stderr"])[-3000:]
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--work", default="/tmp/ckptmgr-gpu")
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--save-step", type=int, default=20)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)  # a warm machine keeps /tmp between calls
    for stage in args.stages:
        started = time.monotonic()
        report = stage_report(args, stage)
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        with open(os.path.join(args.out, f"deepspeed_stage{stage}_gpus{args.devices}.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
