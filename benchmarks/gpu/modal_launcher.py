"""The Modal function body on 2 GPUs, driven without Modal: launcher, DDP, saves, SIGINT, resume.

What `scripts/train/modal_train.py::train` runs in its container (training/on_modal.py), with a local
directory standing in for the Volume: the CPU preflight, then invocation 1 with rank 0 in this process
and rank 1 launched beside it (training/launch.py), NCCL, bf16. Once a checkpoint is committed, this
process gets SIGINT, as Modal's preemption sends it: the invocation must save, stop and end in
KeyboardInterrupt; the same input, run again, must resume from that save and finish.

    python benchmarks/gpu/modal_launcher.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


class LocalRuntime:
    def __init__(self, root: str):
        from training.on_modal import LocalDirectory

        self.root, self.volume = root, LocalDirectory()

    def call_id(self) -> str:
        return "fc-gpu-input-1"  # a restarted input keeps its call id

    def spawn(self, gpu: str, **kwargs: object) -> str:
        raise AssertionError("no successor in this run")


def interrupt_after_first_save(run_dir: str, report: dict) -> None:
    from ckptmgr.catalog import resolve

    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        found = resolve(run_dir, quick=True) if os.path.isdir(run_dir) else None
        if found is not None:
            report["sigint_after_step"] = found.step
            report["sigint_unix"] = time.time()
            os.kill(os.getpid(), signal.SIGINT)  # Modal's preemption
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--root", default="/tmp/ckptmgr-volume")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--save-step", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--accelerator", default="gpu", help="cpu: a dry run of the same path (gloo, fp32)")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ckptmgr").setLevel(logging.INFO)
    from training.on_modal import interrupts_restart_the_input, prepare_run, run_dir_for, run_invocation

    shutil.rmtree(args.root, ignore_errors=True)
    rt = LocalRuntime(args.root)
    precision = "bf16-mixed" if args.accelerator == "gpu" else "32-true"
    options = dict(strategy="ddp", devices=2, accelerator=args.accelerator, precision=precision, width=args.width,
                   layers=args.layers, grace_s=20.0)
    report: dict = {"config": {**options, "save_step": args.save_step, "max_steps": args.max_steps}}
    started = time.monotonic()
    report["prepare"] = prepare_run(rt, run_name="gpu", lang_pair="en-zh", fresh=False, chain="gpu-chain",
                                    config={k: v for k, v in options.items() if k not in ("devices", "grace_s")})
    run_dir = run_dir_for(args.root, "en-zh", "gpu")
    params = dict(run_name="gpu", lang_pair="en-zh", chain="gpu-chain", invocation=1, max_steps=args.max_steps,
                  save_step=args.save_step, time_budget_s=3600.0, gpu="H200:2", **options)
    watcher = threading.Thread(target=interrupt_after_first_save, args=(run_dir, report), daemon=True)
    watcher.start()
    try:
        with interrupts_restart_the_input():
            run_invocation(rt, **params)
        report["first_attempt"] = "returned (no preemption seen)"
    except KeyboardInterrupt as exc:
        report["first_attempt"] = f"KeyboardInterrupt: {exc}"
    report["first_attempt_seconds"] = round(time.monotonic() - started, 1)
    from ckptmgr.catalog import resolve

    found = resolve(run_dir)
    report["after_preemption"] = {"step": found.step if found else None,
                                  "world_size": found.manifest.world_size if found else None}
    again = time.monotonic()
    with interrupts_restart_the_input():
        result = run_invocation(rt, **params)  # Modal restarts the same input
    report["restart"] = {k: result[k] for k in ("start_step", "end_step", "complete", "stop", "resumed_from",
                                                "checkpoints_written", "save_seconds", "wall_seconds")}
    report["restart_seconds"] = round(time.monotonic() - again, 1)
    import subprocess

    verify = subprocess.run([sys.executable, "-m", "ckptmgr", "verify", run_dir, "--json"], capture_output=True,
                            text=True)
    report["verify"] = {"exit": verify.returncode, "all_valid": json.loads(verify.stdout)["all_valid"]}
    report["ok"] = (report["first_attempt"].startswith("KeyboardInterrupt") and result["complete"]
                    and result["start_step"] >= report["after_preemption"]["step"] > 0 and verify.returncode == 0)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "modal_launcher_2gpu.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(json.dumps(report, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
