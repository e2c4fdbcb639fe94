"""A writer for crash tests. Prints `ack STEP` after each save returns (acknowledged).

    save_worker.py RUN_DIR loop [START]            save steps START, START+1, ... forever
    save_worker.py RUN_DIR fault ACTION AT STEP    one save of STEP with a fault at failpoint AT
"""

import sys

from ckptmgr import CheckpointManager
from ckptmgr.testing import Fault, FaultyStorage
from tests.helpers.crashlib import save_step

run_dir, mode = sys.argv[1], sys.argv[2]
if mode == "loop":
    step = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    with CheckpointManager(run_dir, keep_last=2) as manager:
        while True:
            save_step(manager, step)
            print(f"ack {step}", flush=True)
            step += 1
else:
    action, at, step = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    storage = FaultyStorage(Fault(at=at, action=action))
    with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
        save_step(manager, step)
        print(f"ack {step}", flush=True)
