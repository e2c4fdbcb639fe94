"""Several ranks in one container, with rank 0 in this process.

Lightning's DDP launcher starts ranks 1..N-1 by re-executing ``sys.argv`` (``python -m __main__ ...``).
Inside a Modal function that is Modal's own entrypoint, not the trainer, so the ranks never meet
(Modal's GPU guide: frameworks that re-execute the entrypoint need spawn, or training run as a
subprocess; ``ddp_spawn`` cannot pickle a Volume). Here rank 0 stays in the calling process — it
receives Modal's signals and owns ``volume.commit()`` — and ranks 1..N-1 are started as
``python -m training.rank`` with ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``NODE_RANK``/
``LOCAL_RANK`` set, so Lightning sees an externally launched job and launches nothing. The ranks
die with this process (``PR_SET_PDEATHSIG``), are waited for on every normal exit, and a rank that
fails stops the whole attempt rather than leaving rank 0 waiting in a collective.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .run import RunResult, TrainConfig, train

log = logging.getLogger(__name__)

CONFIG_ENV = "CKPTMGR_TRAIN_CONFIG"
EXIT_RANK_FAILED = 70  # EX_SOFTWARE: a rank failed; the attempt stops (a retry resumes)
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK")


def launch(config: TrainConfig, *, durability: Any = None, started_at: float | None = None,
           rank_failure_grace_s: float = 60.0) -> RunResult:
    """Train with ``config.devices`` ranks in this container: rank 0 here, the others as subprocesses."""
    if config.devices <= 1 or config.strategy not in ("ddp", "deepspeed", "fsdp"):
        return train(config, durability=durability, started_at=started_at)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(config.devices),
           "NODE_RANK": "0"}
    with _ranks(config, env, rank_failure_grace_s) as children, _environment({**env, "LOCAL_RANK": "0", "RANK": "0"}):
        try:
            result = train(config, durability=durability, started_at=started_at)
        finally:
            leave_process_group()
        _wait(children)
    return result


def leave_process_group() -> None:
    """Every rank leaves the process group before it exits (or trains again in this process): a gloo or NCCL
    group left to the interpreter's teardown can abort the process (SIGABRT) after a clean run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def _ranks(config: TrainConfig, env: dict[str, str], grace_s: float) -> Iterator[list[subprocess.Popen]]:
    payload = json.dumps(dataclasses.asdict(config))
    children = []
    for rank in range(1, config.devices):
        child_env = {**os.environ, **env, "LOCAL_RANK": str(rank), "RANK": str(rank), CONFIG_ENV: payload}
        children.append(subprocess.Popen([sys.executable, "-m", "training.rank"], env=child_env,
                                         preexec_fn=_die_with_parent))
    stop = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(children, stop, grace_s), name="ckptmgr-ranks", daemon=True)
    watchdog.start()
    try:
        yield children
    finally:
        stop.set()
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _wait(children: list[subprocess.Popen], timeout_s: float = 120.0) -> None:
    """After rank 0's fit returned, the other ranks end too (they left the last collective with it)."""
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.wait(timeout=max(1.0, deadline - time.monotonic()))
    failed = [c.returncode for c in children if c.returncode not in (0, 75)]
    if failed:
        raise RuntimeError(f"a training rank exited with {failed[0]}")


def _watch(children: list[subprocess.Popen], stop: threading.Event, grace_s: float) -> None:
    """A rank that dies while rank 0 trains leaves rank 0 waiting in a collective: end the attempt."""
    while not stop.wait(1.0):
        failed = [c for c in children if c.poll() not in (None, 0, 75)]
        if not failed:
            continue
        log.error("[ckptmgr] training rank (pid %s) exited with %s: stopping this attempt", failed[0].pid,
                  failed[0].returncode)
        if stop.wait(grace_s):
            return  # rank 0 noticed and returned by itself
        for child in children:
            if child.poll() is None:
                child.kill()
        sys.stderr.flush()
        os._exit(EXIT_RANK_FAILED)


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the parent (rank 0, the function's process) dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the waits and the watchdog still end the ranks


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in _DIST_ENV}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_from_env() -> TrainConfig:
    return TrainConfig(**json.loads(os.environ[CONFIG_ENV]))
