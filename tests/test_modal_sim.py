"""The Modal trainer under a simulator of Modal's runtime (ckptmgr.modal_sim).

Each input runs in a fresh process with its own view of the simulated Volume (committed state only, plus
background commits at random moments); preemption is SIGINT then SIGKILL after the grace period, and a
preempted input is restarted; failures are retried; spawns queue new calls. The real `modal_train`
functions run there, through `Function.local`. Each numbered finding of the Modal review has a test here
or in tests/test_modal.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time

from ckptmgr.catalog import resolve
from ckptmgr.modal_sim import Simulator
from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "train", "modal_train.py")
TINY = {"width": 32, "layers": 1}


def simulator(tmp_path, **kwargs) -> Simulator:
    return Simulator(str(tmp_path / "sim"), SCRIPT, env={"PYTHONPATH": REPO}, **kwargs)


def run_dir(sim: Simulator, run: str = "r") -> str:
    return os.path.join(sim.volume, "en-zh", "runs", run)


def start_chain(sim: Simulator, chain: str, run: str = "r", *, fresh: bool = False, **train: object) -> str:
    """What `modal run` does: the CPU preflight, then invocation 1."""
    sim.call("prepare", run_name=run, lang_pair="en-zh", fresh=fresh, chain=chain, config={})
    sim.run()
    params = dict(run_name=run, chain=chain, invocation=1, save_step=10, devices=1, options=dict(TINY))
    params.update(train)
    return sim.call("train", **params)


def trained(sim: Simulator) -> list[tuple[str, int, int, int]]:
    """(call, attempt, start step, end step) of every attempt that returned from training."""
    rows = []
    for call in sim.calls.values():
        for attempt in call.attempts:
            value = attempt.value if isinstance(attempt.value, dict) else {}
            if "start_step" in value:
                rows.append((call.call, attempt.number, value["start_step"], value["end_step"]))
    return rows


def test_two_ranks_launched_in_the_container_train_save_and_resume(tmp_path):
    """Finding 1: rank 0 in the function's process, rank 1 as a subprocess; a preemption, then the restart."""
    sim = simulator(tmp_path)
    # The preemption comes once training runs: two ranks starting on a loaded 2-core CI machine took over 14 s.
    call = start_chain(sim, "two", max_steps=1_000_000, time_budget_s=34, strategy="ddp", devices=2)
    sim.run(preempt=lambda c, n: 24.0 if n == 1 else None)
    attempts = sim.calls[call].attempts
    assert attempts[0].preempted and attempts[0].outcome == "interrupted", attempts[0]
    final = attempts[-1].value
    assert final["stop"] == "time_budget" and final["start_step"] > 0  # resumed, with both ranks
    found = resolve(run_dir(sim))
    assert found.manifest.world_size == 2 and found.step == final["end_step"]


def test_preemptions_at_random_moments_continue_the_chain(tmp_path):
    """Finding 2: 20 preemptions, at random moments (start-up and restore included): each restart resumes
    from a checkpoint no older than one save interval, and none of them is counted as a failure."""
    rng = random.Random(20)
    sim = simulator(tmp_path, grace_s=20)
    call = start_chain(sim, "pre", max_steps=1_000_000, time_budget_s=12, save_step=10)
    moments = [rng.uniform(1.0, 11.0) for _ in range(20)]
    sim.run(preempt=lambda c, n: moments[n - 1] if n <= len(moments) else None)
    attempts = sim.calls[call].attempts
    assert len(attempts) == 21 and all(a.outcome == "interrupted" for a in attempts[:20]), \
        [(a.outcome, a.error) for a in attempts]
    assert attempts[-1].outcome == "returned"
    starts = [int(m.group(1)) for a in attempts[:20] if (m := re.search(r"at step (\d+)", a.message or ""))]
    assert len(starts) >= 5  # most preemptions came while training (the rest during start-up or restore)
    step_at_preemption = 0
    for attempt in attempts:
        if attempt.message and (m := re.search(r"at step (\d+)", attempt.message)):
            step_at_preemption = int(m.group(1))
        if attempt.outcome == "returned":
            assert attempt.value["start_step"] >= step_at_preemption - 10
    assert resolve(run_dir(sim)).step >= max(starts)


def test_retries_at_the_worst_moments_never_fork_or_restart_the_run(tmp_path):
    """Findings 3, 6, 7: crashes right after spawning the successor (each input), preemptions during start-up,
    restore and the first saves (two per input), with a fresh start: the chain never runs two writers, never
    moves the run aside twice, never goes back to step 0."""
    sim = simulator(tmp_path)
    kills: list[str] = []
    state = {"spawn_seen": set()}

    def kill_when(call: str, attempt: int, root: str) -> bool:
        spawns = os.path.join(root, "spawns")
        spawned = {n for n in os.listdir(spawns)} if os.path.isdir(spawns) else set()
        new = spawned - state["spawn_seen"]
        if new and len(kills) < 10:  # right after a spawn: the worst moment for a retry
            state["spawn_seen"] |= new
            kills.append(f"after spawn {sorted(new)[0]}")
            return True
        return False

    def preempt(call: str, attempt: int) -> float | None:
        # Early crashes of each input's first two attempts: during start-up, restore and the first saves.
        return {1: 9.0, 2: 12.0}.get(attempt) if len(kills) < 10 else None

    def crash(call: str, attempt: int, root: str) -> bool:
        return kill_when(call, attempt, root)

    start_chain(sim, "worst", fresh=True, max_steps=1_000_000, time_budget_s=10, auto_continue=True,
                       max_invocations=4, gpu="H100:4")
    sim.run(kill_when=crash, preempt=preempt)
    rows = trained(sim)
    preempted = sum(a.preempted for c in sim.calls.values() for a in c.attempts)
    spawns = sum(1 for c in sim.calls.values() if c.spawned_by)
    assert spawns == 3 and len(kills) == spawns  # each input killed right after it spawned its successor
    assert len(kills) + preempted >= 10, (kills, preempted)  # ten retries and restarts at the worst moments
    # Never back to step 0 once there was progress, and every invocation starts where the chain stood.
    progress = 0
    for _, _, start, end in rows:
        assert start >= progress - 10, rows
        progress = max(progress, end)
    # One run directory: the fresh start moved nothing aside twice (there was nothing to move).
    assert sorted(os.listdir(os.path.join(sim.volume, "en-zh", "runs"))) == ["r"]
    # The chain record: each invocation ran under its own call, each successor spawned once.
    with open(os.path.join(run_dir(sim), ".ckptmgr", "chain.json")) as f:
        chain = json.load(f)
    spawned = [e.get("spawned") for e in chain["invocations"].values() if e.get("spawned")]
    assert len(spawned) == len(set(spawned))
    for call_id in sim.calls:
        requests = [c for c in sim.calls.values() if c.spawned_by == call_id]
        assert len(requests) <= 1, "an input spawned two successors"
    # Every successor asked for the first invocation's GPU (finding 4).
    assert {c.kwargs.get("gpu") for c in sim.calls.values() if c.function == "train" and c.spawned_by} == {"H100:4"}


def test_the_successor_mounts_everything_its_predecessor_wrote(tmp_path):
    """Finding 6: the Volume is committed before spawn: at the moment of the spawn, the committed state holds
    the predecessor's newest checkpoint and the successor's place in the chain record."""
    sim = simulator(tmp_path)
    seen = {}

    def check(call: str, attempt: int, root: str) -> bool:
        spawns = os.path.join(root, "spawns")
        if os.path.isdir(spawns) and os.listdir(spawns) and "checked" not in seen:
            found = resolve(run_dir(sim))
            with open(os.path.join(run_dir(sim), ".ckptmgr", "chain.json")) as f:
                seen.update(checked=True, step=found.step if found else None, chain=json.load(f))
        return False

    start_chain(sim, "spawn", max_steps=1_000_000, time_budget_s=10, auto_continue=True, max_invocations=2)
    sim.run(kill_when=check)
    first = [c for c in sim.calls.values() if c.function == "train" and not c.spawned_by][0]
    assert seen["step"] == first.result["end_step"]  # the last save was committed before the spawn
    assert seen["chain"]["invocations"]["2"]["spawned_by"] == 1


def test_a_second_chain_is_refused_while_one_is_live(tmp_path):
    """Finding 7: a second `modal run` on a live run is refused with a clear message, and an input that is
    not the recorded successor refuses to run."""
    sim = simulator(tmp_path)
    first = start_chain(sim, "live", max_steps=1_000_000, time_budget_s=40)
    sim.queue.remove(first)
    runner = threading.Thread(target=sim._run_call, args=(first, None, None, time.monotonic() + 600))
    runner.start()
    lease = os.path.join(run_dir(sim), ".ckptmgr", "lease.json")
    deadline = time.monotonic() + 120
    while not os.path.exists(lease) and time.monotonic() < deadline:
        time.sleep(0.2)
    second = sim.call("prepare", run_name="r", lang_pair="en-zh", fresh=True, chain="other", config={})
    intruder = sim.call("train", run_name="r", chain="live", invocation=2, save_step=10, devices=1, max_steps=10,
                        time_budget_s=30, options=dict(TINY))
    sim.max_retries = 0
    sim.run()
    runner.join()
    (refused,) = sim.calls[second].attempts
    assert refused.outcome == "failed" and "a chain is already training this run" in refused.error
    (stray,) = sim.calls[intruder].attempts
    assert stray.outcome == "failed" and "not recorded in chain live" in stray.error
    assert sorted(os.listdir(os.path.join(sim.volume, "en-zh", "runs"))) == ["r"]  # nothing moved aside
    assert sim.calls[first].attempts[-1].value["stop"] == "time_budget"
