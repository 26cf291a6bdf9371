"""distvit: fine-tune pretrained Vision Transformers across GPUs and nodes."""

__version__ = "0.1.0"

import time as _time

STARTED = _time.monotonic()
"""When distvit was first imported (the command's start, before torch): start-up time counts from here."""
