"""A writer for crash tests. Prints `ack STEP` after each save returns (acknowledged).

    save_worker.py RUN_DIR MODE loop [START]            save steps START, START+1, ... forever
    save_worker.py RUN_DIR MODE fault ACTION AT STEP    one save of STEP with a fault at failpoint AT

MODE is one of tests/helpers/crashlib.py's MODES.
"""

import sys

from ckptmgr import CheckpointManager
from ckptmgr.testing import Fault, FaultyStorage
from tests.helpers.crashlib import save_step

run_dir, mode, what = sys.argv[1], sys.argv[2], sys.argv[3]
if what == "loop":
    step = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    with CheckpointManager(run_dir, keep_last=2) as manager:
        while True:
            save_step(manager, step, mode)
            print(f"ack {step}", flush=True)
            step += 1
else:
    action, at, step = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    storage = FaultyStorage(Fault(at=at, action=action))
    with CheckpointManager(run_dir, keep_last=2, storage=storage) as manager:
        save_step(manager, step, mode)
        print(f"ack {step}", flush=True)
