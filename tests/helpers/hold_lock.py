"""Take a run directory's writer lock, say so, and hold it until killed."""

import sys
import time

from ckptmgr import CheckpointManager

manager = CheckpointManager(sys.argv[1]).open()
print("locked", flush=True)
time.sleep(600)
