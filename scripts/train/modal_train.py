"""Train on Modal across 24 h invocations, durably, with one command.

    modal run scripts/train/modal_train.py --run-name my-run --max-steps 200000 --auto-continue
    modal run --detach scripts/train/modal_train.py --run-name my-run --auto-continue   # survives the laptop
    modal run scripts/train/modal_train.py::walk                                       # the volume doctor
    modal run scripts/train/modal_train.py::export --src /output/en-zh/runs/my-run/last.ckpt

Each invocation trains within its own time budget (the function's timeout
minus a margin), saves through ckptmgr, and commits the Volume after every
publish: a save is acknowledged only when ``volume.commit()`` returned. With
``--auto-continue`` an invocation that stopped on its budget spawns the next
one itself (so the chain goes on without the local client), until training is
complete or ``--max-invocations`` is reached.

Locally, ``CKPTMGR_LOCAL_VOLUME=DIR`` makes DIR stand in for the Volume mount:
``train.local(...)`` then runs the same code path with no Modal account.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any

import modal

APP_NAME = "ckptmgr-train"
VOLUME_NAME = os.environ.get("CKPTMGR_VOLUME", "infinisst-outputs")
MOUNT = "/output"
GPU = os.environ.get("CKPTMGR_GPU", "H100:8")
TIMEOUT_S = 86400  # Modal's per-attempt maximum: 24 h
BUDGET_MARGIN_S = 1800  # stop training this long before the timeout; the save's own time is added
RETRIES = 3  # preemptions and crashes restart the attempt, which resumes
MAX_INVOCATIONS = 10
LOCAL_VOLUME = os.environ.get("CKPTMGR_LOCAL_VOLUME")


def parse_gpu(spec: str) -> tuple[str, int]:
    """``"H100:8"`` -> ("H100", 8); ``"A10G"`` -> ("A10G", 1)."""
    kind, _, count = spec.partition(":")
    if not kind or (count and (not count.isdigit() or int(count) < 1)):
        raise ValueError(f"GPU spec {spec!r}: expected TYPE or TYPE:COUNT with COUNT >= 1, e.g. H100:8")
    return kind, int(count) if count else 1


app = modal.App(APP_NAME)
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)  # lazy: importing needs no network
image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("torch==2.9.1", "lightning>=2.4", "pytorch-lightning>=2.4", "deepspeed>=0.15", "xxhash>=4",
                 "filelock>=3.13", "rich>=13", "safetensors>=0.4")
    .add_local_python_source("ckptmgr", "training")
)


def is_local_mode() -> bool:
    return LOCAL_VOLUME is not None


def volume_root() -> str:
    return LOCAL_VOLUME if LOCAL_VOLUME is not None else MOUNT


class VolumeCommit:
    """ckptmgr's durability hook: a save is acknowledged only once the Volume commit returned."""

    def __init__(self, target: Any):
        self.target = target
        self.commits = 0

    def persist(self, path: str) -> None:
        self.target.commit()
        self.commits += 1


class LocalDirectory:
    """Stands in for the Volume locally: data is durable once fsynced (ckptmgr already did)."""

    def commit(self) -> None:
        os.sync()


def run_dir_for(root: str, lang_pair: str, run_name: str) -> str:
    return os.path.join(root, lang_pair, "runs", run_name)


def run_invocation(*, root: str, lang_pair: str, run_name: str, max_steps: int, save_step: int, resume: bool,
                   time_budget_s: float, durability: Any, **options: Any) -> dict[str, Any]:
    """One invocation of the trainer on the volume; returns its summary and where the run stands."""
    from ckptmgr.history import estimate
    from ckptmgr.journal import read_events
    from training.run import TrainConfig, train

    # The function-level margin is already taken off the budget; the trainer adds the predicted save time.
    config = TrainConfig(output_dir=os.path.join(root, lang_pair), run_name=run_name, max_steps=max_steps,
                         save_step=save_step, resume=resume, time_budget=str(time_budget_s), budget_margin_s=0.0,
                         progress_bar=False, **options)
    result = train(config, durability=durability).as_dict()
    left = estimate(read_events(config.run_dir), total_steps=max_steps, time_limit_s=time_budget_s,
                    current_step=result["end_step"])
    result["estimated_invocations_left"] = 0 if result["complete"] else left.invocations_needed
    return result


def should_continue(result: dict[str, Any], invocation: int, max_invocations: int) -> tuple[bool, str]:
    """Launch another invocation? Only for a clean stop on the time budget with progress made."""
    if result["complete"]:
        return False, "training complete"
    if invocation >= max_invocations:
        return False, f"reached --max-invocations {max_invocations}"
    if result["stop_reason"] != "time budget":
        return False, f"stopped by {result['stop_reason']}: not continuing automatically"
    if result["end_step"] <= result["start_step"]:
        return False, "no progress in this invocation: not continuing"
    return True, "time budget reached: continuing"


def report(result: dict[str, Any], invocation: int) -> str:
    left = result.get("estimated_invocations_left")
    return (f"[invocation {invocation}] steps {result['start_step']} -> {result['end_step']} of {result['max_steps']}"
            f" ({'complete' if result['complete'] else result['stop_reason']}); "
            f"{result['checkpoints_written']} checkpoint(s) this invocation; "
            f"estimated invocations left: {'unknown' if left is None else left}; run {result['run_dir']}")


@app.function(image=image, gpu=GPU, timeout=TIMEOUT_S, retries=modal.Retries(max_retries=RETRIES),
              volumes={MOUNT: volume})
def train(run_name: str = "demo", max_steps: int = 2000, save_step: int = 200, lang_pair: str = "en-zh",
          resume: bool = True, auto_continue: bool = False, invocation: int = 1,
          max_invocations: int = MAX_INVOCATIONS, strategy: str = "auto", devices: int | None = None,
          precision: str | None = None, time_budget_s: float | None = None) -> dict[str, Any]:
    """One training invocation; with ``auto_continue`` it launches the next one itself."""
    budget = time_budget_s if time_budget_s is not None else TIMEOUT_S - BUDGET_MARGIN_S
    target = LocalDirectory() if is_local_mode() else volume
    options: dict[str, Any] = {"strategy": strategy}
    if devices is not None:
        options["devices"] = devices
    if precision is not None:
        options["precision"] = precision
    # Never volume.reload() here: it fails while files are open, and the writer has nothing to learn from it.
    result = run_invocation(root=volume_root(), lang_pair=lang_pair, run_name=run_name, max_steps=max_steps,
                            save_step=save_step, resume=resume or invocation > 1, time_budget_s=budget,
                            durability=VolumeCommit(target), **options)
    result["invocation"] = invocation
    print(report(result, invocation), flush=True)
    go_on, why = should_continue(result, invocation, max_invocations)
    result["continue_reason"] = why
    if auto_continue and go_on:
        kwargs = dict(run_name=run_name, max_steps=max_steps, save_step=save_step, lang_pair=lang_pair, resume=True,
                      auto_continue=True, invocation=invocation + 1, max_invocations=max_invocations,
                      strategy=strategy, devices=devices, precision=precision, time_budget_s=time_budget_s)
        if is_local_mode():
            result["next"] = train.local(**kwargs)
        else:
            result["next_call_id"] = train.spawn(**kwargs).object_id
    return result


def _cli(args: list[str]) -> tuple[int, str]:
    from ckptmgr.cli import main as ckptmgr_main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = ckptmgr_main(args)
    return code, buffer.getvalue()


@app.function(image=image, volumes={MOUNT: volume}, timeout=3600)
def walk(path: str = MOUNT, quick: bool = False, json: bool = False) -> int:
    """`ckptmgr walk` on the Volume."""
    code, text = _cli(["walk", _on_volume(path), *(["--quick"] if quick else []), *(["--json"] if json else [])])
    print(text, end="")
    return code


@app.function(image=image, volumes={MOUNT: volume}, timeout=3600)
def verify(path: str = MOUNT, json: bool = False) -> int:
    """`ckptmgr verify` on the Volume."""
    code, text = _cli(["verify", _on_volume(path), *(["--json"] if json else [])])
    print(text, end="")
    return code


@app.function(image=image, volumes={MOUNT: volume}, timeout=6 * 3600, memory=65536)
def export(src: str, output: str = "", format: str = "safetensors", max_shard_size: str = "",
           strip_prefix: str = "_forward_module.", dtype: str = "") -> int:
    """`ckptmgr export` from the Volume to the Volume, committed when done."""
    src = _on_volume(src)
    output = _on_volume(output) if output else os.path.join(os.path.dirname(src.rstrip("/")), "export")
    args = ["export", src, "-o", output, "--format", format]
    args += ["--max-shard-size", max_shard_size] if max_shard_size else []
    args += ["--strip-prefix", strip_prefix] if strip_prefix else []
    args += ["--dtype", dtype] if dtype else []
    code, text = _cli(args)
    print(text, end="")
    if code == 0:
        (LocalDirectory() if is_local_mode() else volume).commit()
    return code


def _on_volume(path: str) -> str:
    """Paths are given as seen in the container (/output/...); locally they map into the stand-in directory."""
    if is_local_mode() and (path == MOUNT or path.startswith(MOUNT + "/")):
        return os.path.join(volume_root(), path[len(MOUNT):].lstrip("/"))
    return path


@app.local_entrypoint()
def main(run_name: str = "demo", max_steps: int = 2000, save_step: int = 200, lang_pair: str = "en-zh",
         resume_training: bool = True, auto_continue: bool = False, gpu: str = GPU,
         max_invocations: int = MAX_INVOCATIONS, strategy: str = "auto") -> None:
    _, count = parse_gpu(gpu)
    function = train if gpu == GPU else train.with_options(gpu=gpu)
    result = function.remote(run_name=run_name, max_steps=max_steps, save_step=save_step, lang_pair=lang_pair,
                             resume=resume_training, auto_continue=auto_continue, max_invocations=max_invocations,
                             strategy=strategy, devices=count)
    print(report(result, 1))
    while result.get("next_call_id"):  # follow the chain the invocations spawn themselves
        result = modal.FunctionCall.from_id(result["next_call_id"]).get()
        print(report(result, result["invocation"]))
    print(f"done: {result['continue_reason']}")
    sys.exit(0 if result["complete"] else 75)
