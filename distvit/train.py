"""Training entry point, run by Accelerate as a file:

    accelerate launch [--multi_gpu --num_processes N ...] distvit/train.py --config configs/demo.yaml [key=value ...]

All logic lives in the package (`distvit.cli`, `distvit.engine`); this file only makes it importable, and
makes SIGTERM, SIGUSR1 and SIGINT stop requests before anything else (distvit.engine.signals): the
launcher may pass one on while this process is still importing torch.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file, Python puts distvit/ itself first on sys.path; import the package from the
    # repository root instead (works with or without `pip install -e .`).
    _package_dir = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _package_dir]
    sys.path.insert(0, str(_package_dir.parent))

from distvit.engine import signals  # noqa: E402  (the standard library only)

if __name__ == "__main__":
    signals.install()
    try:
        from distvit.cli import train_main
    except signals.StoppedDuringStartup as stop:  # the request came while the command was being imported
        sys.exit(signals.report_startup_stop(stop))
    sys.exit(train_main())
