"""A simulator of Modal's runtime, for tests: a test double shipped with the library (like FaultyStorage).

It reproduces what a chain of long-running GPU inputs depends on, with real processes and real files:

- **each input runs in a fresh process** (a container: ``single_use_containers=True``), started with
  ``python -m ckptmgr.modal_sim container ...``, which imports the app's script and runs the function's
  body (``Function.local``);
- **a Volume view per container**: a container starts from a copy of the Volume's *committed* state and
  sees only that and its own writes; ``commit()`` publishes its changes file by file, last writer wins;
  ``reload()`` replaces its view with the committed state. Modal also commits **in the background at
  random moments** (a thread here, snapshotting whatever is on disk, half-written files included), and
  on **graceful exit** only (return, exception, ``KeyboardInterrupt``; not SIGKILL);
- **preemption** is SIGINT, then SIGKILL after the grace period; an input that ends in
  ``KeyboardInterrupt`` (or is killed after SIGINT) is **restarted on the same input**, without
  counting as a retry;
- **retries** re-run a failed input (same call id) up to ``max_retries`` times, including after it had
  already spawned its successor; a test can kill a container at a chosen moment (a ``kill_when`` check);
- ``spawn`` queues a new call; one container of a function runs at a time (``max_containers=1``), and
  several calls may be run at once to put **two containers on one run**.

The container side is :class:`ContainerRuntime` (what the app's ``runtime()`` returns when ``active()``);
the driver side is :class:`Simulator`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

ENV_ROOT, ENV_CONTAINER, ENV_CALL = "CKPTMGR_SIM_ROOT", "CKPTMGR_SIM_CONTAINER", "CKPTMGR_SIM_CALL"
EXIT_RETURNED, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def active() -> bool:
    """True inside a simulated container."""
    return ENV_ROOT in os.environ


# -- the Volume ----------------------------------------------------------------------
@contextlib.contextmanager
def _commit_lock(root: str) -> Iterator[None]:
    """Commits of all containers are applied one at a time (each is atomic per file)."""
    with open(os.path.join(root, "commit.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _listing(top: str) -> dict[str, tuple[int, int, int, bool]]:
    """Every file, symlink and directory under ``top``: relative path -> (inode, size, mtime_ns, kind)."""
    found: dict[str, tuple[int, int, int, bool]] = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                found[os.path.relpath(path, top) + os.sep] = (0, 0, 0, False)  # a directory (no content to copy)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed while we walked
            found[os.path.relpath(path, top)] = (st.st_ino, st.st_size, st.st_mtime_ns, os.path.islink(path))
    return found


def _copy_entry(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.sim-{uuid.uuid4().hex[:8]}"
    try:
        if os.path.islink(src):
            os.symlink(os.readlink(src), tmp)
        else:
            shutil.copyfile(src, tmp)  # whatever is on disk now: a half-written file is copied half-written
        os.replace(tmp, dst)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class SimVolume:
    """One container's view of the Volume (``view``) over the shared committed state (``committed``)."""

    def __init__(self, root: str, view: str):
        self.root = root
        self.committed = os.path.join(root, "volume")
        self.view = view
        self._lock = threading.Lock()
        self._mounted = _listing(view)
        self.commits = 0

    def commit(self) -> None:
        with self._lock, _commit_lock(self.root):
            now = _listing(self.view)
            for rel, meta in now.items():
                if rel.endswith(os.sep):
                    os.makedirs(os.path.join(self.committed, rel), exist_ok=True)
                elif self._mounted.get(rel) != meta:
                    _copy_entry(os.path.join(self.view, rel), os.path.join(self.committed, rel))
            gone = set(self._mounted) - set(now)  # removed in this view since the last commit
            for rel in sorted(gone, key=len, reverse=True):  # files first, then their (now empty) directories
                path = os.path.join(self.committed, rel)
                with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError, OSError):
                    os.rmdir(path) if rel.endswith(os.sep) else os.unlink(path)
            self._mounted = now
            self.commits += 1

    def reload(self) -> None:
        with self._lock, _commit_lock(self.root):
            shutil.rmtree(self.view)
            shutil.copytree(self.committed, self.view, symlinks=True)
            self._mounted = _listing(self.view)


class ContainerRuntime:
    """What the app's function bodies get inside a simulated container."""

    def __init__(self, root: str, container: str, call: str):
        self.sim_root = root
        self.root = os.path.join(root, "containers", container)  # the mount point: this container's view
        self.volume = SimVolume(root, self.root)
        self._call = call

    @classmethod
    def from_env(cls) -> ContainerRuntime:
        global _RUNTIME
        if _RUNTIME is None:
            _RUNTIME = cls(os.environ[ENV_ROOT], os.environ[ENV_CONTAINER], os.environ[ENV_CALL])
        return _RUNTIME

    def call_id(self) -> str:
        return self._call

    def spawn(self, gpu: str, **kwargs: Any) -> str:
        call = f"fc-{uuid.uuid4().hex[:12]}"
        _write_json(os.path.join(self.sim_root, "spawns", f"{call}.json"),
                    {"call": call, "function": "train", "kwargs": dict(kwargs, gpu=gpu), "by": self._call,
                     "gpu": gpu, "unix": time.time()})
        return call


_RUNTIME: ContainerRuntime | None = None


def _write_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, default=str)
    os.replace(tmp, path)


def _background_commits(volume: SimVolume, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(0.2, 1.5)):
        with contextlib.suppress(OSError):
            volume.commit()


def container_main(argv: list[str]) -> int:
    """``python -m ckptmgr.modal_sim container SCRIPT FUNCTION KWARGS_JSON RESULT_PATH``: one input, one process."""
    script, function, kwargs, result_path = argv[0], argv[1], json.loads(argv[2]), argv[3]
    rt = ContainerRuntime.from_env()
    stop = threading.Event()
    committer = threading.Thread(target=_background_commits, args=(rt.volume, stop, hash(rt.root) % 10_000),
                                 daemon=True)
    committer.start()
    sys.path.insert(0, os.path.dirname(script))
    outcome: dict[str, Any]
    try:
        module = __import__(os.path.splitext(os.path.basename(script))[0])
        value = getattr(module, function).local(**kwargs)
        outcome, code = {"outcome": "returned", "value": value}, EXIT_RETURNED
    except KeyboardInterrupt as exc:
        outcome, code = {"outcome": "interrupted", "message": str(exc)}, EXIT_INTERRUPTED
    except BaseException as exc:  # what Modal reports as the input's failure
        outcome = {"outcome": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        code = EXIT_FAILED
    stop.set()
    rt.volume.commit()  # the exit commit: graceful exits only
    _write_json(result_path, outcome)
    return code


# -- the driver ----------------------------------------------------------------------
@dataclass
class Attempt:
    call: str
    number: int
    outcome: str  # returned | interrupted | failed | killed
    value: Any = None
    error: str | None = None
    message: str | None = None
    preempted: bool = False
    seconds: float = 0.0


@dataclass
class Call:
    call: str
    function: str
    kwargs: dict[str, Any]
    attempts: list[Attempt] = field(default_factory=list)
    spawned_by: str | None = None

    @property
    def result(self) -> Any:
        returned = [a for a in self.attempts if a.outcome == "returned"]
        return returned[-1].value if returned else None


class Simulator:
    """Runs an app's functions the way Modal would, on a simulated Volume under ``root``.

    ``preempt(call, attempt_number)`` returns seconds after the container's start at which to send SIGINT
    (None: never); ``kill_when(call, attempt_number, root)`` is polled while a container runs, and a true
    answer SIGKILLs it at once (a crash at that moment: the input is retried).
    """

    def __init__(self, root: str, script: str, *, grace_s: float = 30.0, max_retries: int = 3, seed: int = 0,
                 env: dict[str, str] | None = None):
        self.root = root
        self.script = script
        self.grace_s = grace_s
        self.max_retries = max_retries
        self.rng = random.Random(seed)
        self.env = env or {}
        self.calls: dict[str, Call] = {}
        self.queue: list[str] = []
        os.makedirs(os.path.join(root, "volume"), exist_ok=True)

    @property
    def volume(self) -> str:
        """The committed state: what a new container (or `modal volume get`) sees."""
        return os.path.join(self.root, "volume")

    def call(self, function: str, **kwargs: Any) -> str:
        call = f"fc-{uuid.uuid4().hex[:12]}"
        self.calls[call] = Call(call, function, kwargs)
        self.queue.append(call)
        return call

    def run(self, *, preempt: Callable[[str, int], float | None] | None = None,
            kill_when: Callable[[str, int, str], bool] | None = None, timeout_s: float = 1800) -> None:
        """Run every queued call (and every call they spawn) to its end, one container at a time."""
        deadline = time.monotonic() + timeout_s
        while self.queue:
            if time.monotonic() > deadline:
                raise TimeoutError("the simulated chain did not finish in time")
            self._run_call(self.queue.pop(0), preempt, kill_when, deadline)

    def run_together(self, calls: list[str], **kwargs: Any) -> None:
        """Start several queued calls at once (two containers on one run)."""
        threads = [threading.Thread(target=self._run_call, args=(c, kwargs.get("preempt"), kwargs.get("kill_when"),
                                                                 time.monotonic() + kwargs.get("timeout_s", 1800)))
                   for c in calls]
        for call in calls:
            self.queue.remove(call)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _run_call(self, call_id: str, preempt: Any, kill_when: Any, deadline: float) -> None:
        call = self.calls[call_id]
        failures = 0
        while True:
            attempt = self._attempt(call, len(call.attempts) + 1, preempt, kill_when, deadline)
            call.attempts.append(attempt)
            self._collect_spawns()
            if attempt.outcome == "returned":
                return
            if attempt.preempted or attempt.outcome == "interrupted":
                continue  # Modal restarts a preempted input; that is not a retry
            failures += 1
            if failures > self.max_retries:
                return

    def _attempt(self, call: Call, number: int, preempt: Any, kill_when: Any, deadline: float) -> Attempt:
        container = f"{call.call}-{number}-{uuid.uuid4().hex[:6]}"
        view = os.path.join(self.root, "containers", container)
        with _commit_lock(self.root):
            shutil.copytree(self.volume, view, symlinks=True)
        result_path = os.path.join(self.root, "results", f"{container}.json")
        env = {**os.environ, **self.env, ENV_ROOT: self.root, ENV_CONTAINER: container, ENV_CALL: call.call,
               "CKPTMGR_LOCAL_VOLUME": view}
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "ckptmgr.modal_sim", "container", self.script, call.function,
                                 json.dumps(call.kwargs), result_path], env=env)
        sigint_at = preempt(call.call, number) if preempt else None
        preempted = killed = False
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if sigint_at is not None and not preempted and elapsed >= sigint_at:
                proc.send_signal(signal.SIGINT)
                preempted, sigint_sent = True, time.monotonic()
            if preempted and time.monotonic() - sigint_sent > self.grace_s:
                proc.kill()  # the grace period is over
                killed = True
            if kill_when is not None and not killed and kill_when(call.call, number, self.root):
                proc.kill()
                killed = True
            if time.monotonic() > deadline:
                proc.kill()
                killed = True
            time.sleep(0.02)
        seconds = time.monotonic() - started
        if killed or not os.path.exists(result_path):
            return Attempt(call.call, number, "killed", preempted=preempted, seconds=seconds)
        with open(result_path) as f:
            data = json.load(f)
        return Attempt(call.call, number, data["outcome"], value=data.get("value"), error=data.get("error"),
                       message=data.get("message"), preempted=preempted, seconds=seconds)

    def _collect_spawns(self) -> None:
        spawns = os.path.join(self.root, "spawns")
        if not os.path.isdir(spawns):
            return
        for name in sorted(os.listdir(spawns)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(spawns, name)) as f:
                request = json.load(f)
            if request["call"] not in self.calls:
                self.calls[request["call"]] = Call(request["call"], request["function"], request["kwargs"],
                                                   spawned_by=request["by"])
                self.queue.append(request["call"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["container"]:
        sys.exit(container_main(sys.argv[2:]))
    sys.exit("usage: python -m ckptmgr.modal_sim container SCRIPT FUNCTION KWARGS_JSON RESULT_PATH")
