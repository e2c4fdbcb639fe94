"""``python -m training.rank``: one of ranks 1..N-1, started by :mod:`training.launch` (never by hand).

The configuration comes in the environment (``CKPTMGR_TRAIN_CONFIG``), as do the torch distributed
variables; rank 0 is the launching process.
"""

from __future__ import annotations

import sys

from ckptmgr import CkptMgrError

from .__main__ import quiet_lightning
from .launch import config_from_env, leave_process_group
from .run import train


def main() -> int:
    quiet_lightning()
    try:
        return train(config_from_env()).exit_code
    except CkptMgrError as exc:
        sys.stderr.write(f"training rank: error: {exc}\n")
        return exc.exit_code
    finally:
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
