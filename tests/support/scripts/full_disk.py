"""distvit/train.py on a file system that fills up: rank 0's write of step_00000006.pt fails as torch reports
a full disk (a RuntimeError from its zip writer); every rank must stop with the same one-line error."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from distvit.cli import train_main  # noqa: E402

original = torch.save


def filling_save(obj, handle, *args, **kwargs):
    if "step_00000006.pt" in str(getattr(handle, "name", "")):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1408 vs 1344")
    return original(obj, handle, *args, **kwargs)


torch.save = filling_save
sys.exit(train_main())
