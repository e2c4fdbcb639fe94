"""``python -m training``: train the tiny transformer with managed checkpoints.

Exit codes: 0 training complete; 75 stopped on the time budget or a signal
(run the same command again to continue); 1 no valid checkpoint to resume;
2 bad arguments; 7 checkpoint from another config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

STARTED_AT = time.time()  # the per-invocation budget counts from process start


def build_parser() -> argparse.ArgumentParser:
    from .run import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=d.output_dir, help="checkpoints go to OUTPUT_DIR/runs/RUN_NAME")
    p.add_argument("--run-name", default=d.run_name)
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps in total (-1: no limit)")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--save-step", type=int, default=d.save_step, help="save every N optimizer steps")
    p.add_argument("--keep-last", type=int, default=d.keep_last, help="periodic checkpoints to keep")
    p.add_argument("--time-budget", default=d.time_budget,
                   help="this invocation's wall-clock budget: seconds, 45m, 23.5h or DD:HH:MM:SS")
    p.add_argument("--budget-margin", type=float, default=d.budget_margin_s, dest="budget_margin_s",
                   help="seconds kept free at the end of the budget (plus the predicted save time)")
    p.add_argument("--grace", type=float, default=d.grace_s, dest="grace_s",
                   help="seconds a preemption signal leaves; a save that cannot fit is not started")
    p.add_argument("--train-bsz", type=int, default=d.train_bsz)
    p.add_argument("--grad-acc-steps", type=int, default=d.grad_acc_steps)
    p.add_argument("--strategy", choices=["auto", "ddp", "deepspeed", "fsdp"], default=d.strategy,
                   help="fsdp: Lightning's FSDPStrategy with sharded (DCP) checkpoints; needs GPUs")
    p.add_argument("--deepspeed-stage", type=int, choices=[1, 2, 3], default=d.deepspeed_stage)
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--accelerator", default=d.accelerator, help="auto, cpu or gpu")
    p.add_argument("--precision", default=d.precision, help="32-true, bf16-mixed, ...")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start fresh: the existing run directory is moved aside, never deleted")
    p.add_argument("--allow-fresh", action="store_true",
                   help="start fresh if checkpoints exist but none is valid (default: fail loudly)")
    p.add_argument("--force-config", action="store_true", help="resume a checkpoint written under another config")
    p.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    p.add_argument("--async-save", action="store_true",
                   help="snapshot to host memory and persist in the background: the copy overlaps the next "
                        "forward/backward and the optimizer step waits for it (with DeepSpeed, on every rank)")
    p.add_argument("--checkpointing", choices=["managed", "lightning"], default=d.checkpointing,
                   help="lightning: Lightning's plain ModelCheckpoint, no resume (a benchmark baseline)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def quiet_lightning() -> None:
    """Keep the output to what the user needs: progress, the resume decision, the summary."""
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ckptmgr").setLevel(logging.INFO)
    # After Lightning's import, which sets its loggers to INFO.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # expected: we resume there


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ckptmgr import CkptMgrError

    from .run import TrainConfig, train

    quiet_lightning()

    as_json = args.__dict__.pop("json")
    config = TrainConfig(**vars(args))
    try:
        result = train(config, started_at=STARTED_AT)
    except CkptMgrError as exc:
        sys.stderr.write(f"training: error: {exc}\n")
        return exc.exit_code
    if result.global_rank != 0:
        return result.exit_code  # one summary per run, from global rank 0
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    elif result.end_step or result.start_step:
        print(f"[ckptmgr] steps {result.start_step} -> {result.end_step} of {result.max_steps} "
              f"({'complete' if result.complete else 'stopped: ' + result.stop_reason}); "
              f"{result.checkpoints_written} checkpoint(s) written, {result.save_seconds:.2f} s saving, "
              f"{result.wall_seconds:.1f} s in all; run directory {result.run_dir}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
