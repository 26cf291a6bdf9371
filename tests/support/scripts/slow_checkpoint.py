"""distvit/train.py with rank 0's checkpoint writes slowed to 15 s each (a slow shared file system):
the other ranks wait for it on the long-timeout gloo group, so train.timeout_s=10 must not trip."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from distvit.cli import train_main  # noqa: E402
from distvit.run import checkpoint_files  # noqa: E402

original = checkpoint_files.save_checkpoint


def slow_save(path, payload):
    time.sleep(15)
    return original(path, payload)


checkpoint_files.save_checkpoint = slow_save  # the file layer the Checkpointer writes through
sys.exit(train_main())
