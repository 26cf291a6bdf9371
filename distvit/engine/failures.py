"""A damaged sample found on one rank stops every rank with its message, at the same step.

Streamed samples are read by the one rank whose plan holds them, in the middle of a step, while the
other ranks wait in that step's collectives: if that rank raised at once, the others would stop later
with a lost-peer error instead of the sample's message (and with NCCL only after train.timeout_s). So
with several ranks the rank notes the problem and goes on with zeros in place of the sample; at the next
point where all ranks meet anyway (the stop check, a checkpoint, an epoch's end, the end of an
evaluation or of feature caching) every rank raises the same DataError. Nothing is saved in between: the
steps after the damaged sample are lost with the run, as they would be with an immediate stop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from distvit.errors import DataError


class SampleFailures:
    """The first sample problem this rank met, until the ranks agree to stop on it."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.message: str | None = None

    @property
    def handler(self) -> Callable[[str], None] | None:
        """What a batch source reports a sample's problem to; None (raise at once) on a single rank."""
        return self.note if self.accelerator.num_processes > 1 else None

    def note(self, message: str) -> None:
        if self.message is None:
            self.message = f"{message} (found by rank {self.accelerator.process_index})"

    def flag(self) -> int:
        """1 when this rank holds a problem: a term of the flags the ranks sum (see StopRequests)."""
        return int(self.message is not None)

    def raise_if_any(self, ranks_with_problems: int) -> None:
        """Given the summed flags (the same number on every rank): raise the lowest such rank's message on
        every rank. A collective when the number is not zero."""
        if ranks_with_problems:
            messages = gather_object([self.message]) if self.accelerator.num_processes > 1 else [self.message]
            raise DataError(next(message for message in messages if message))

    def check(self) -> None:
        """A collective of its own, for points that have no flags to sum with (evaluation's end)."""
        if self.accelerator.num_processes == 1:
            return self.raise_if_any(self.flag())
        count = torch.tensor([self.flag()], device=self.accelerator.device)
        self.raise_if_any(int(self.accelerator.reduce(count, reduction="sum").item()))
