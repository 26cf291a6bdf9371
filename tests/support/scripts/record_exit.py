"""distvit/train.py as the launcher runs it, each rank's exit status then written to
$DISTVIT_TEST_EXIT_DIR/rank<RANK>: a launcher stopped by a signal reports its own status, not its ranks'."""

import os
import runpy
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[3] / "distvit" / "train.py"

try:
    runpy.run_path(str(TRAIN), run_name="__main__")
    status = 0
except SystemExit as done:
    status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
Path(os.environ["DISTVIT_TEST_EXIT_DIR"], f"rank{os.environ.get('RANK', '0')}").write_text(str(status))
sys.exit(status)
