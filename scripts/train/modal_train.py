"""Train on Modal across 24 h invocations, durably, with one command.

    modal run scripts/train/modal_train.py --run-name my-run --max-steps 200000 --gpu H100:8 --auto-continue
    modal run --detach scripts/train/modal_train.py --run-name my-run --auto-continue   # survives the laptop
    modal run scripts/train/modal_train.py::walk                                       # the volume doctor
    modal run scripts/train/modal_train.py::verify --path /output/en-zh/runs/my-run
    modal run scripts/train/modal_train.py::seal --path /output/en-zh/runs/my-run/last.ckpt --step 12000
    modal run scripts/train/modal_train.py::export --src /output/en-zh/runs/my-run/last.ckpt

One `modal run` is one *chain* of invocations of ``train`` on one run directory:

1. ``prepare`` (CPU, not retried on a GPU) refuses a second chain while one is live, does the fresh
   start (``--no-resume-training``: the old run moved aside, never deleted) once, checks that the run
   resolves and its config matches, records the chain on the Volume and commits.
2. ``train`` (GPU, ``single_use_containers``, one container at a time, retried) is admitted by the
   chain record (a retry of an input that already spawned its successor returns at once; an input that
   is not the recorded successor refuses), takes the run's writer lease, trains within its budget with
   rank 0 in the function's own process (ranks 1..N-1 as subprocesses: training/launch.py), and every
   save is acknowledged only after ``volume.commit()``. A preemption (SIGINT) saves if the save fits the
   grace period and ends in ``KeyboardInterrupt``, so Modal restarts the same input, which resumes. With
   ``--auto-continue`` an invocation that stopped on its budget commits, then spawns its successor on the
   same GPU spec.

Offline, ``CKPTMGR_LOCAL_VOLUME=DIR`` makes DIR stand in for the Volume mount (``train.local(...)``), and
``ckptmgr.modal_sim`` runs these functions the way Modal's runtime would (fresh process per input,
SIGINT then SIGKILL, retries, per-container Volume views): that is how the tests run them.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import uuid
from typing import Any

import modal

from training.on_modal import (
    LocalDirectory,
    interrupts_restart_the_input,
    prepare_run,
    report,
    run_dir_for,
    run_invocation,
    should_continue,
)

APP_NAME = "ckptmgr-train"
VOLUME_NAME = os.environ.get("CKPTMGR_VOLUME", "infinisst-outputs")
MOUNT = "/output"
GPU = os.environ.get("CKPTMGR_GPU", "H100:8")
TIMEOUT_S = 86400  # Modal's per-attempt maximum: 24 h
BUDGET_MARGIN_S = 1800  # stop training this long before the timeout; the save's own time is added
GRACE_S = 20.0  # of Modal's 30 s after a preemption signal: the rest is for teardown and the exit commit
RETRIES = 3  # crashes retry the attempt (preemptions restart it without counting), which resumes
MAX_INVOCATIONS = 10
__all__ = ["LocalDirectory", "interrupts_restart_the_input", "report", "run_dir_for", "should_continue"]
CPU, MEMORY_MB = 16.0, 131072  # reserved for the GPU function: data loading and the snapshot copies
LOCAL_VOLUME = os.environ.get("CKPTMGR_LOCAL_VOLUME")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    # The project's own pins, not a second list (its `modal` extra brings nothing the container needs).
    .pip_install_from_pyproject(os.path.join(REPO, "pyproject.toml"), optional_dependencies=["lightning", "deepspeed"])
    .add_local_python_source("ckptmgr", "training")
)


# -- where the function runs: Modal, a local directory, or the simulator -------------------
def runtime() -> Any:
    """What the function body needs from its platform: the Volume, its call id, and how to spawn."""
    from ckptmgr import modal_sim

    if modal_sim.active():
        return modal_sim.ContainerRuntime.from_env()
    if LOCAL_VOLUME is not None:
        return _LocalRuntime()
    return _ModalRuntime()


class _ModalRuntime:
    root = MOUNT
    volume = volume

    def call_id(self) -> str:
        return modal.current_function_call_id() or f"local-{uuid.uuid4().hex[:12]}"

    def spawn(self, gpu: str, **kwargs: Any) -> str:
        return train.with_options(gpu=gpu).spawn(gpu=gpu, **kwargs).object_id


class _LocalRuntime:
    """``CKPTMGR_LOCAL_VOLUME``: a successor runs after this invocation returns, in this process."""

    root = LOCAL_VOLUME or MOUNT
    volume = LocalDirectory()
    _next_call: str | None = None  # the id spawn() gave the successor, taken by the successor's runtime

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None
        self._id = _LocalRuntime._next_call or f"local-{uuid.uuid4().hex[:12]}"
        _LocalRuntime._next_call = None

    def call_id(self) -> str:
        return self._id

    def spawn(self, gpu: str, **kwargs: Any) -> str:
        self.pending = dict(gpu=gpu, **kwargs)
        self.successor = f"local-{uuid.uuid4().hex[:12]}"
        return self.successor


# -- the Modal functions ----------------------------------------------------------------------
@app.function(image=image, volumes={MOUNT: volume}, cpu=2.0, memory=8192, timeout=1800)
def prepare(run_name: str = "demo", lang_pair: str = "en-zh", fresh: bool = False, chain: str = "",
            config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chain's CPU preflight (see the module docstring)."""
    return prepare_run(runtime(), run_name=run_name, lang_pair=lang_pair, fresh=fresh, chain=chain,
                       config=config or {})


@app.function(image=image, gpu=GPU, cpu=CPU, memory=MEMORY_MB, timeout=TIMEOUT_S,
              retries=modal.Retries(max_retries=RETRIES), volumes={MOUNT: volume}, single_use_containers=True,
              max_containers=1)
def train(run_name: str = "demo", max_steps: int = 2000, save_step: int = 200, lang_pair: str = "en-zh",
          chain: str = "", invocation: int = 1, auto_continue: bool = False, max_invocations: int = MAX_INVOCATIONS,
          gpu: str = GPU, strategy: str = "auto", devices: int | None = None, precision: str | None = None,
          time_budget_s: float | None = None, grace_s: float = GRACE_S, resume: bool = True,
          options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One training invocation of a chain; with ``auto_continue`` it spawns the next one itself.

    ``options``: more fields of ``training.run.TrainConfig`` (``keep_last``, ``width``, ...). Called
    without a ``chain`` (a direct call, not through ``main``), it prepares a chain of its own first.
    """
    budget = time_budget_s if time_budget_s is not None else TIMEOUT_S - BUDGET_MARGIN_S
    settings = dict(options or {}, strategy=strategy, grace_s=grace_s,
                    devices=devices if devices is not None else _visible_devices())
    if precision is not None:
        settings["precision"] = precision
    rt = runtime()
    with interrupts_restart_the_input():
        if not chain:
            chain = uuid.uuid4().hex[:12]
            prepare_run(rt, run_name=run_name, lang_pair=lang_pair, fresh=not resume, chain=chain,
                        config={k: v for k, v in settings.items() if k != "devices"})
        # Never volume.reload() here: it fails while files are open, and a fresh container has the newest view.
        result = run_invocation(rt, run_name=run_name, lang_pair=lang_pair, chain=chain, invocation=invocation,
                                max_steps=max_steps, save_step=save_step, time_budget_s=budget,
                                auto_continue=auto_continue, max_invocations=max_invocations, gpu=gpu, **settings)
    print(report(result, invocation), flush=True)
    if isinstance(rt, _LocalRuntime) and rt.pending is not None:
        _LocalRuntime._next_call = rt.successor
        result["next"] = train.local(**rt.pending)
    return result


def _visible_devices() -> int:
    """Every GPU of the container (one process on a machine without GPUs)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _cli(args: list[str]) -> tuple[int, str]:
    from ckptmgr.cli import main as ckptmgr_main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = ckptmgr_main(args)
    return code, buffer.getvalue()


def _on_volume(path: str) -> str:
    """Paths are given as seen in the container (/output/...); locally they map into the stand-in directory."""
    root = runtime().root
    if root != MOUNT and (path == MOUNT or path.startswith(MOUNT + "/")):
        return os.path.join(root, path[len(MOUNT):].lstrip("/"))
    return path


@app.function(image=image, volumes={MOUNT: volume}, timeout=3600)
def walk_volume(path: str = MOUNT, quick: bool = False, json: bool = False) -> int:
    """`ckptmgr walk` on the Volume; returns its exit code."""
    code, text = _cli(["walk", _on_volume(path), *(["--quick"] if quick else []), *(["--json"] if json else [])])
    print(text, end="")
    return code


@app.function(image=image, volumes={MOUNT: volume}, timeout=3600)
def verify_volume(path: str = MOUNT, json: bool = False) -> int:
    """`ckptmgr verify` on the Volume; returns its exit code."""
    code, text = _cli(["verify", _on_volume(path), *(["--json"] if json else [])])
    print(text, end="")
    return code


@app.function(image=image, volumes={MOUNT: volume}, timeout=6 * 3600)
def seal_volume(path: str, step: int | None = None, epoch: int | None = None) -> int:
    """`ckptmgr seal` of one of the team's existing checkpoints on the Volume, committed when done."""
    args = ["seal", _on_volume(path), *(["--step", str(step)] if step is not None else []),
            *(["--epoch", str(epoch)] if epoch is not None else [])]
    code, text = _cli(args)
    print(text, end="")
    if code == 0:
        runtime().volume.commit()
    return code


@app.function(image=image, volumes={MOUNT: volume}, timeout=6 * 3600, memory=65536)
def export_volume(src: str, output: str = "", format: str = "safetensors", max_shard_size: str = "",
                  strip_prefix: str = "_forward_module.", dtype: str = "") -> int:
    """`ckptmgr export` from the Volume to the Volume (beside the run directory by default), committed."""
    src = _on_volume(src)
    output = _on_volume(output) if output else default_export_path(src)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    args = ["export", src, "-o", output, "--format", format]
    args += ["--max-shard-size", max_shard_size] if max_shard_size else []
    args += ["--strip-prefix", strip_prefix] if strip_prefix else []
    args += ["--dtype", dtype] if dtype else []
    code, text = _cli(args)
    print(text, end="")
    if code == 0:
        runtime().volume.commit()
    return code


def default_export_path(src: str) -> str:
    """``/output/en-zh/runs/my-run/last.ckpt`` -> ``/output/en-zh/exports/my-run-last``: outside the run."""
    run_dir = os.path.dirname(src.rstrip("/"))
    runs = os.path.dirname(run_dir)
    stem = os.path.splitext(os.path.basename(src.rstrip("/")))[0]
    return os.path.join(os.path.dirname(runs), "exports", f"{os.path.basename(run_dir)}-{stem}")


# -- what `modal run` starts -------------------------------------------------------------------
def _exit(code: int) -> None:
    """Exit codes reach the shell; success is not reported as an exception."""
    if code:
        sys.exit(code)


@app.local_entrypoint()
def main(run_name: str = "demo", max_steps: int = 2000, save_step: int = 200, lang_pair: str = "en-zh",
         resume_training: bool = True, auto_continue: bool = False, gpu: str = GPU,
         max_invocations: int = MAX_INVOCATIONS, strategy: str = "auto") -> None:
    kind, count = parse_gpu(gpu)
    chain = uuid.uuid4().hex[:12]
    print(f"Volume {VOLUME_NAME!r} at {MOUNT}; run {run_dir_for(MOUNT, lang_pair, run_name)}; {count}x {kind}; "
          f"chain {chain}", flush=True)
    plan = prepare.remote(run_name=run_name, lang_pair=lang_pair, fresh=not resume_training, chain=chain,
                          config={"strategy": strategy})
    if plan["moved_aside"]:
        print(f"fresh start: the old run was moved to {plan['moved_aside']} (nothing deleted)")
    print(f"resume: {plan['resume_from'] or 'nothing yet: starting at step 0'}", flush=True)
    call = train.with_options(gpu=gpu).spawn(run_name=run_name, max_steps=max_steps, save_step=save_step,
                                             lang_pair=lang_pair, chain=chain, invocation=1, gpu=gpu,
                                             auto_continue=auto_continue, max_invocations=max_invocations,
                                             strategy=strategy, devices=count)
    result = call.get()  # retries are driven by Modal's servers, not this client: --detach keeps working
    print(report(result, 1))
    while result.get("next_call_id"):  # follow the chain the invocations spawn themselves
        result = modal.FunctionCall.from_id(result["next_call_id"]).get()
        print(report(result, result["invocation"]))
    print(f"done: {result.get('continue_reason')}")
    _exit(0 if result.get("complete") else 75)


@app.local_entrypoint()
def walk(path: str = MOUNT, quick: bool = False, json: bool = False) -> None:
    _exit(walk_volume.remote(path=path, quick=quick, json=json))


@app.local_entrypoint()
def verify(path: str = MOUNT, json: bool = False) -> None:
    _exit(verify_volume.remote(path=path, json=json))


@app.local_entrypoint()
def seal(path: str, step: int | None = None, epoch: int | None = None) -> None:
    _exit(seal_volume.remote(path=path, step=step, epoch=epoch))


@app.local_entrypoint()
def export(src: str, output: str = "", format: str = "safetensors", max_shard_size: str = "",
           strip_prefix: str = "_forward_module.", dtype: str = "") -> None:
    _exit(export_volume.remote(src=src, output=output, format=format, max_shard_size=max_shard_size,
                               strip_prefix=strip_prefix, dtype=dtype))
