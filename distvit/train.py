"""Training entry point, run by Accelerate as a file:

    accelerate launch [--multi_gpu --num_processes N ...] distvit/train.py --config configs/demo.yaml [key=value ...]

All logic lives in the package (`distvit.cli`, `distvit.engine`); this file only makes it importable.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file, Python puts distvit/ itself first on sys.path; import the package from the
    # repository root instead (works with or without `pip install -e .`).
    _package_dir = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _package_dir]
    sys.path.insert(0, str(_package_dir.parent))

from distvit.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
