"""What the ranks know of each other: the same model everywhere, waiting for rank 0's own work, and
naming the ranks that stopped responding."""

from __future__ import annotations

from datetime import timedelta

from accelerate.utils import gather_object

from distvit.errors import DistvitError
from distvit.model.record import SurgeryRecord


def check_same_model_everywhere(record: SurgeryRecord) -> None:
    """All ranks compare their post-surgery fingerprints before DDP wraps the model (its broadcast from
    rank 0 would hide a difference in the weights, though not in the plan or in what is frozen)."""
    prints = gather_object([record.fingerprint])
    differing = [rank for rank, value in enumerate(prints) if value != prints[0]]
    if differing:
        raise DistvitError(
            f"the model after surgery differs between ranks: rank(s) {differing} disagree with rank 0 "
            f"(fingerprints {', '.join(p[:12] for p in prints)}). Every rank must see the same config, "
            f"weights file and library versions (timm {record.timm_version} here)."
        )


MAIN_PROCESS_WORK_TIMEOUT = timedelta(hours=1)
"""How long the other ranks wait for rank-0-only work (checkpoint writes, W&B start, plots)."""


class PeerMonitor:
    """A separate gloo group (CPU, whatever the training backend) for two jobs the training collectives
    must not do: waiting for rank-0-only work without tripping train.timeout_s (a slow checkpoint write
    is not a hung rank), and naming the ranks that stopped responding when a collective fails (the
    healthy ranks enter a monitored barrier; rank 0 learns which never did)."""

    def __init__(self, world_size: int, timeout_s: int):
        import torch.distributed as dist

        several = world_size > 1 and dist.is_initialized()
        # First a group with the training timeout: if gloo cannot connect (say, a host name that resolves
        # to a loopback address on a multi-node job) this fails within train.timeout_s, before the
        # long-timeout group for rank-0 waits could hang for an hour.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if several else None
        self.wait_group = dist.new_group(backend="gloo", timeout=MAIN_PROCESS_WORK_TIMEOUT) if several else None

    def wait_for_main(self, error: str | None = None) -> None:
        """Every rank waits here while rank 0 finishes its own work (up to MAIN_PROCESS_WORK_TIMEOUT). Rank
        0 passes the error its work ended with, if any: every rank then raises it, so all stop together
        with the same message instead of waiting for a rank that is gone."""
        if self.wait_group is not None:
            import torch.distributed as dist

            shared = [error]
            dist.broadcast_object_list(shared, src=0, group=self.wait_group)
            error = shared[0]
        if error:
            raise DistvitError(error)

    def unresponsive(self, seconds: float = 15.0) -> str:
        """A description of the unresponsive ranks, as far as this rank can tell."""
        if self.group is None:
            return ""
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=seconds), wait_all_ranks=True)
        except Exception as err:  # its message names the ranks that did not arrive
            return str(err).splitlines()[0][:300]
        return "all ranks answered a barrier afterwards"


def is_peer_failure(err: BaseException) -> bool:
    """A collective that timed out or lost its peers (gloo and NCCL report these in several ways); not
    any error that mentions a timeout (a slow file system on one rank is not a lost peer)."""
    import torch.distributed as dist

    text = str(err).lower()
    markers = (
        "timed out waiting",
        "watchdog caught collective operation timeout",
        "connection closed by peer",
        "connection reset by peer",
        "nccl communicator was aborted",
        "failed to pass monitoredbarrier",
    )
    return isinstance(err, dist.DistError) or any(marker in text for marker in markers)


def main_only(accelerator, work, what: str) -> str | None:
    """Run rank 0's own work; the error it ends with (a full disk, an unwritable folder), for every rank
    to stop with (PeerMonitor.wait_for_main), instead of rank 0 leaving alone and the others waiting."""
    if not accelerator.is_main_process:
        return None
    try:
        work()
    except (OSError, DistvitError) as err:
        if isinstance(err, DistvitError):
            return str(err)
        reason = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        return (
            f"{what} failed ({reason}). Fix the cause (free space, permissions) and run again with train.resume=auto."
        )
    return None
